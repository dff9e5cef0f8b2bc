import ast
import inspect

import pytest
import torch

from core.model import denoiser as denoiser_module
from core.model.denoiser import CDenoiser, timestep_embedding

B, N, DC = 6, 32, 12


def _inputs(seed=0, steps=10):
    generator = torch.Generator().manual_seed(seed)
    x_t = torch.randn(B, N, generator=generator)
    t = torch.randint(0, steps, (B,), generator=generator)
    condition = torch.randn(B, DC, generator=generator)
    return x_t, t, condition


def _model(**overrides):
    kwargs = dict(
        num_outputs=N, condition_dim=DC, width=48, depth=2, dropout=0.1, time_embedding_dim=16
    )
    kwargs.update(overrides)
    torch.manual_seed(0)
    return CDenoiser(**kwargs)


def test_output_shape_and_zero_at_init():
    model = _model()
    x_t, t, condition = _inputs()
    output = model(x_t, t, condition)
    assert output.shape == (B, N)
    assert torch.count_nonzero(output) == 0


def test_gradients_reach_every_parameter_after_one_step():
    model = _model()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    x_t, t, condition = _inputs()
    target = torch.randn(B, N, generator=torch.Generator().manual_seed(1))

    loss = torch.nn.functional.mse_loss(model(x_t, t, condition), target)
    loss.backward()
    # First step: the zero head blocks the gradient to everything before it.
    assert model.output.weight.grad.abs().sum() > 0
    assert model.input_projection.weight.grad.abs().sum() == 0
    optimizer.step()
    optimizer.zero_grad()

    loss = torch.nn.functional.mse_loss(model(x_t, t, condition), target)
    loss.backward()
    for name, parameter in model.named_parameters():
        assert parameter.grad is not None, name
        assert parameter.grad.abs().sum() > 0, name


def test_output_depends_on_timestep_and_condition_after_training_starts():
    model = _model(dropout=0.0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x_t, t, condition = _inputs()
    target = torch.randn(B, N, generator=torch.Generator().manual_seed(2))
    for _ in range(2):
        optimizer.zero_grad()
        torch.nn.functional.mse_loss(model(x_t, t, condition), target).backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        base = model(x_t, t, condition)
        other_t = model(x_t, (t + 1) % 10, condition)
        other_condition = model(x_t, t, condition + 1.0)
    assert not torch.allclose(base, other_t)
    assert not torch.allclose(base, other_condition)


def test_timestep_embedding_is_distinct_per_timestep():
    steps = torch.arange(1000)
    embedding = timestep_embedding(steps, 32)
    assert embedding.shape == (1000, 32) and embedding.dtype == torch.float32
    distances = torch.cdist(embedding, embedding)
    distances.fill_diagonal_(float("inf"))
    assert distances.min() > 1e-3
    assert torch.allclose(embedding[0], torch.cat([torch.ones(16), torch.zeros(16)]))
    odd = timestep_embedding(torch.arange(5), 7)
    assert odd.shape == (5, 7) and torch.all(odd[:, -1] == 0)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"depth": 0}, "depth"),
        ({"width": 0}, "width"),
        ({"num_outputs": 0}, "num_outputs"),
        ({"condition_dim": 0}, "condition_dim"),
        ({"time_embedding_dim": 1}, "time_embedding_dim"),
        ({"dropout": 1.0}, "dropout"),
    ],
)
def test_constructor_validation(overrides, message):
    with pytest.raises(ValueError, match=message):
        _model(**overrides)


def test_forward_validation():
    model = _model()
    x_t, t, condition = _inputs()
    with pytest.raises(ValueError, match="x_t"):
        model(x_t[:, :-1], t, condition)
    with pytest.raises(ValueError, match="t must be"):
        model(x_t, t[:-1], condition)
    with pytest.raises(ValueError, match="condition"):
        model(x_t, t, condition[:, :-1])


def test_depth_one_works():
    model = _model(depth=1, dropout=0.0)
    x_t, t, condition = _inputs()
    assert model(x_t, t, condition).shape == (B, N)
    assert len(model.blocks) == 1


def test_denoiser_module_does_not_import_the_diffusion_module():
    tree = ast.parse(inspect.getsource(denoiser_module))
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            imported.add(node.module or "")
            imported.update(f"{node.module}.{alias.name}" for alias in node.names)
    assert not any("diffusion" in name for name in imported), imported
