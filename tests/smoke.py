"""The smoke-size run the tests train: Nations, no images, tiny widths, two epochs per stage."""

SMOKE = [
    "data.dataset=nations",
    "features.image_encoder=none",
    "model.hidden_dim=32",
    "model.num_heads=2",
    "structure.encoder=mgat",  # the paper's model: the tests exercise its subgraph sampler
    "structure.max_nodes=8",
    "diffusion.steps=5",
    "diffusion.denoiser_width=32",
    "train.stage1_epochs=2",
    "train.stage2_epochs=2",
    "train.batch_size=64",
    "eval.official_samples=2",
    # Two stage-2 epochs rarely beat their stage 1; tests that read the stage-2 model (its
    # protocols, its epochs) keep it. The selection rule itself is tested on its own.
    "train.stage2_selection=stage2-only",
]
