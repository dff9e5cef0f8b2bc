from pathlib import Path

import pytest
import torch

from core.data.builtin import load_builtin
from core.data.files import DatasetError

# (entities, relations, train, valid, test) as published with each dataset.
EXPECTED = {
    "nations": (14, 55, 1592, 199, 201),
    "umls": (135, 46, 5216, 652, 661),
    "kinships": (104, 25, 8544, 1068, 1074),
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_builtin_counts(name):
    graph = load_builtin(name)
    counts = (
        graph.num_entities,
        graph.num_relations,
        len(graph.train),
        len(graph.valid),
        len(graph.test),
    )
    assert counts == EXPECTED[name]
    assert len(graph.candidates) == graph.num_entities
    assert all(images == () for images in graph.entity_images)


def test_word_datasets_have_text_and_kinships_has_none():
    umls = load_builtin("umls")
    assert "acquired abnormality" in umls.entity_texts
    assert all(umls.entity_texts)
    kinships = load_builtin("kinships")
    assert not any(kinships.entity_texts)


def test_ids_round_trip_to_the_shipped_file():
    graph = load_builtin("nations")
    first_line = Path(graph.source, "train.txt").read_text().splitlines()[0].split("\t")
    head, relation, tail = graph.train[0].tolist()
    assert [graph.entities[head], graph.relations[relation], graph.entities[tail]] == first_line


def test_answer_indexes_separate_training_from_evaluation_facts():
    graph = load_builtin("umls")
    train_index, all_index = graph.train_answers(), graph.all_answers()
    head, relation, tail = graph.test[0].tolist()
    _, train_answers = train_index.lookup(torch.tensor([head]), torch.tensor([relation]))
    _, all_answers = all_index.lookup(torch.tensor([head]), torch.tensor([relation]))
    assert tail in all_answers.tolist()
    assert tail not in train_answers.tolist()  # test facts of UMLS are not training facts
    # The reciprocal query (tail, r⁻¹, ?) answers the head.
    _, inverse = all_index.lookup(
        torch.tensor([tail]), torch.tensor([relation + graph.num_relations])
    )
    assert head in inverse.tolist()


def test_unknown_builtin_name_lists_choices():
    with pytest.raises(DatasetError, match="kinships, nations, umls"):
        load_builtin("fb15k")


def test_an_empty_answer_index_answers_nothing():
    from core.data.graph import AnswerIndex

    index = AnswerIndex(torch.zeros(0, 3, dtype=torch.long), num_entities=4, num_relations=2)
    rows, cols = index.lookup(torch.tensor([0, 1]), torch.tensor([0, 3]))
    assert rows.numel() == cols.numel() == 0
    assert index.multi_hot(torch.tensor([0]), torch.tensor([1])).sum() == 0
