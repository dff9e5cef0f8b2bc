"""Dataset statistics for ``diffcom data check``: counts, modality coverage and test leakage.

Leakage matters for honest numbers: WN18 is known for test triples whose inverse is a training fact
(``(t, r', h)`` in train), which a model answers by lookup rather than inference.
"""

from __future__ import annotations

import torch

from core.data.graph import KnowledgeGraph

__all__ = ["dataset_statistics", "format_statistics"]


def _pair_keys(triples: torch.Tensor, num_entities: int, first: int, second: int) -> torch.Tensor:
    return triples[:, first] * num_entities + triples[:, second]


def _leakage(graph: KnowledgeGraph, split: str) -> dict:
    """Counts of ``split`` triples that training facts give away, and of unseen entities."""
    triples, train = graph.split(split), graph.train
    num_entities, num_relations = graph.num_entities, graph.num_relations
    train_triple_keys = (train[:, 0] * num_relations + train[:, 1]) * num_entities + train[:, 2]
    triple_keys = (triples[:, 0] * num_relations + triples[:, 1]) * num_entities + triples[:, 2]
    train_pairs = _pair_keys(train, num_entities, 0, 2)
    train_entities = torch.unique(train[:, [0, 2]])
    unseen = ~torch.isin(triples[:, 0], train_entities) | ~torch.isin(triples[:, 2], train_entities)
    return {
        "triples": len(triples),
        "also_in_train": int(torch.isin(triple_keys, train_triple_keys).sum()),
        "inverse_pair_in_train": int(
            torch.isin(_pair_keys(triples, num_entities, 2, 0), train_pairs).sum()
        ),
        "same_pair_in_train": int(
            torch.isin(_pair_keys(triples, num_entities, 0, 2), train_pairs).sum()
        ),
        "with_entity_unseen_in_train": int(unseen.sum()),
    }


def dataset_statistics(graph: KnowledgeGraph) -> dict:
    """Counts, image and text coverage, and leakage of valid and test against train."""
    summary = graph.summary()
    entities = max(graph.num_entities, 1)
    summary["image_coverage"] = round(summary["entities_with_images"] / entities, 4)
    summary["text_coverage"] = round(summary["entities_with_text"] / entities, 4)
    summary["content_hash"] = graph.content_hash()
    summary["source"] = graph.source
    summary["load_report"] = graph.report
    summary["leakage"] = {split: _leakage(graph, split) for split in ("valid", "test")}
    return summary


def format_statistics(statistics: dict) -> str:
    """A short human-readable report of :func:`dataset_statistics`."""
    s = statistics
    lines = [
        f"dataset      {s['name']}  ({s['source']})",
        f"content hash {s['content_hash']}",
        f"entities     {s['entities']:,}   candidates {s['candidates']:,}   relations {s['relations']:,}",
        f"triples      train {s['train']:,} / valid {s['valid']:,} / test {s['test']:,}",
        f"text         {s['entities_with_text']:,} entities with text ({s['text_coverage']:.1%})",
        f"images       {s['images']:,} images on {s['entities_with_images']:,} entities "
        f"({s['image_coverage']:.1%})",
    ]
    report = s["load_report"]
    if report.get("skipped_images"):
        skipped = ", ".join(
            f"{count:,} {reason}" for reason, count in report["skipped_images"].items()
        )
        lines.append(f"             skipped: {skipped}")
    if "entities_without_image_folder" in report:
        lines.append(
            f"             {report['entities_without_image_folder']:,} entities without an image folder"
        )
    if report.get("unreadable_image_folders"):
        lines.append(
            f"             {report['unreadable_image_folders']:,} entities whose image folder cannot "
            "be read (images skipped)"
        )
    dropped = report.get("dropped_unknown", {})
    if any(dropped.values()):
        lines.append(
            "dropped      "
            + ", ".join(f"{count:,} {split}" for split, count in dropped.items() if count)
            + " triples with unknown ids"
        )
    for split, leak in s["leakage"].items():
        total = max(leak["triples"], 1)
        lines.append(
            f"leakage      {split}: {leak['also_in_train']:,} also in train, "
            f"{leak['inverse_pair_in_train']:,} ({leak['inverse_pair_in_train'] / total:.1%}) with the "
            f"inverse pair in train, {leak['same_pair_in_train']:,} with the same pair in train, "
            f"{leak['with_entity_unseen_in_train']:,} with an entity unseen in train"
        )
    return "\n".join(lines)
