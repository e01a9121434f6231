"""Device plumbing: every tensor sed_lens creates meets the model on the model's device.

On a machine with CUDA or an Apple GPU the ``accelerator`` tests train, capture, project and measure the
coupling there and compare with the CPU (they skip elsewhere). Everywhere, :class:`VirtualDevice` emulates a
second device on the CPU: the model's parameters are tagged as living on "the device", tensors made without a
``device=`` (or moved with ``.cpu()``) as living on the host, and tags follow every torch operation; an
operation that mixes a device tensor with a host tensor of one or more dimensions raises, as it would on a GPU
(0-dim host tensors mix freely and CPU index tensors may index device tensors, as on CUDA). ``.to(device)``
stands for the move to the model's device.
"""

from __future__ import annotations

import pytest
import torch
from torch.overrides import TorchFunctionMode

from sed_lens import (
    GradientCapture,
    ModularArithmetic,
    ParamSubspace,
    SubspaceProjection,
    TrainConfig,
    Trainer,
    build_model,
    centroid_response,
    centroids,
    coupling,
    evaluate,
)
from sed_lens.devices import model_device, resolve_device
from sed_lens.errors import SedLensError
from sed_lens.hooks.capture import capture_task_gradients
from sed_lens.models import op_losses

TAG = "_sed_lens_where"
DEV, HOST = "device", "host"


class DeviceMismatch(RuntimeError):
    pass


def _tensors(obj, out):
    if isinstance(obj, torch.Tensor):
        out.append(obj)
    elif isinstance(obj, (list, tuple)):
        for o in obj:
            _tensors(o, out)
    elif isinstance(obj, dict):
        for o in obj.values():
            _tensors(o, out)
    return out


def where(t: torch.Tensor) -> str | None:
    return getattr(t, TAG, None)


def tag(obj, value: str | None) -> None:
    if value is None:
        return
    for t in _tensors(obj, []):
        try:
            setattr(t, TAG, value)
        except (AttributeError, RuntimeError):  # functorch wrappers and the like: left untagged (unchecked)
            pass


class VirtualDevice(TorchFunctionMode):
    """See the module docstring. ``with VirtualDevice(model):`` tags the model's parameters and buffers."""

    def __init__(self, *modules: torch.nn.Module) -> None:
        super().__init__()
        for m in modules:
            tag([*m.parameters(), *m.buffers()], DEV)
        self.checked = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        inputs = _tensors([args, kwargs], [])
        out = func(*args, **kwargs)
        if name == "cpu":
            tag(out, HOST)
        elif name in ("cuda", "mps"):
            tag(out, DEV)
        elif name == "to":
            rest = [*args[1:], *kwargs.values()]
            if any(isinstance(a, (str, torch.device)) for a in rest):
                if out is args[0]:  # a no-op move on the real CPU returns the tensor itself: tag an alias instead
                    out = out.view_as(out)
                tag(out, DEV)
            elif any(isinstance(a, torch.Tensor) for a in rest):
                tag(out, where(next(a for a in rest if isinstance(a, torch.Tensor))))
            else:
                tag(out, where(args[0]))
        elif kwargs.get("device") is not None:
            tag(out, DEV)
        elif name == "__getitem__":  # a device tensor may be indexed by host indices, not the reverse
            if where(args[0]) == HOST and any(where(t) == DEV for t in inputs[1:] if t.ndim > 0):
                raise DeviceMismatch(f"{name}: a host tensor indexed by a device tensor")
            tag(out, where(args[0]))
        elif name in ("__setitem__", "copy_", "set_", "__get__"):
            pass  # copies between devices are allowed; properties are not operations
        else:
            tags = {where(t) for t in inputs if t.ndim > 0}
            if DEV in tags and HOST in tags:
                shapes = [(tuple(t.shape), where(t)) for t in inputs]
                raise DeviceMismatch(f"{name} mixes tensors on the device and on the host: {shapes}")
            self.checked += 1
            all_tags = {where(t) for t in inputs}
            tag(out, DEV if DEV in all_tags else HOST if HOST in all_tags or not inputs else None)
        return out


def tiny(p: int = 11, ops=("add",), init: str = "tl", device: str = "cpu"):
    task = ModularArithmetic(p, ops, 0.5, seed=0)
    return task, build_model("xu2026", task, init=init, seed=0, device=device)


def test_virtual_device_catches_mixed_tensors():
    _, model = tiny()
    with VirtualDevice(model) as mode:
        host = torch.ones(3)
        moved = host.to(model_device(model))
        w = next(model.parameters())
        assert where(host) == HOST and where(moved) == DEV and where(w * 2) == DEV
        assert where(moved + torch.zeros(3, device="cpu")) == DEV
        with pytest.raises(DeviceMismatch):
            moved + host
        moved + torch.tensor(2.0)  # 0-dim host tensors mix, as on CUDA
        assert mode.checked > 0


def test_a_missing_move_is_caught():
    """The check bites on the real code path: labels left on the host fail in the loss (TransformerLens moves
    tokens itself, labels are ours to move), and a task built under the mode is on the host."""
    _, model = tiny()
    with VirtualDevice(model):
        task = ModularArithmetic(11, ("add",), 0.5, seed=0)
        tokens, labels = task.train
        assert where(tokens) == HOST
        with pytest.raises(DeviceMismatch):
            op_losses(model, tokens[:16], {op: y[:16] for op, y in labels.items()})
        dev = model_device(model)
        op_losses(model, tokens[:16].to(dev), {op: y[:16].to(dev) for op, y in labels.items()})


def test_training_capture_and_projection_stay_on_the_model_device():
    _, model = tiny(ops=("add", "sub"))
    with VirtualDevice(model) as mode:
        task = ModularArithmetic(11, ("add", "sub"), 0.5, seed=0)  # its tensors are on the host
        cap = GradientCapture(sources=("update", "gradient", "task_gradient"), window=2, k=1, every=2)
        for basis in ("sed", "random"):
            proj = SubspaceProjection(k=1, mode="keep", basis=basis, window=2)
            Trainer(model, task, TrainConfig(steps=4, batch_size=16, eval_every=2, checkpoint_every=0),
                    [cap, proj] if basis == "sed" else [proj], progress=False).fit()
        upd = SubspaceProjection(k=1, mode="remove", basis="sed", apply_to="update", window=2)
        Trainer(model, task, TrainConfig(steps=4, batch_size=16, eval_every=4, checkpoint_every=0), [upd],
                progress=False).fit()
        evaluate(model, task)
        S = ParamSubspace.attention(model)
        grads = capture_task_gradients(model, task, S)
        assert set(grads) == {"add", "sub"}  # (autograd's results are not tagged: made outside Python)
        assert mode.checked > 500


@pytest.mark.parametrize("method", ["jvp", "hvp", "fd"])
def test_centroids_and_coupling_stay_on_the_model_device(method):
    _, model = tiny()
    with VirtualDevice(model):
        task = ModularArithmetic(11, ("add",), 0.5, seed=0)
        probes = task.probes(16, seed=0)
        S = ParamSubspace.attention(model)
        mu = centroids(model, *probes)
        assert mu.shape == (16, 2, 128)  # (torch.func results are not tagged)
        dirs = S.random_directions(2, torch.Generator().manual_seed(1))
        res = coupling(model, S, dirs, probes, n_random=3, method=method)
        A = centroid_response(model, S, dirs, probes, method=method, readout=torch.ones(11), probe_batch=8)
        assert res.R.shape == (2,) and A.shape == (2,) and A.device.type == "cpu"


def test_resolve_device():
    assert resolve_device("cpu") == "cpu"
    assert resolve_device("auto") in ("cpu", "cuda", "mps")
    assert resolve_device("auto") == ("cuda" if torch.cuda.is_available() else resolve_device("auto"))
    with pytest.raises(SedLensError, match="unknown device"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(SedLensError, match="no CUDA GPU"):
            resolve_device("cuda")


# --- real accelerators (skip where there is none) -------------------------------------------------------------
ACCELERATORS = [pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")),
                pytest.param("mps", marks=pytest.mark.skipif(
                    not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()), reason="no Apple GPU"))]


@pytest.mark.parametrize("device", ACCELERATORS)
def test_accelerator_training_capture_projection(device):
    task, model = tiny(ops=("add", "sub"), device=device)
    assert model_device(model).type == device
    cap = GradientCapture(sources=("update", "gradient", "task_gradient"), window=4, k=2, every=2)
    proj = SubspaceProjection(k=2, mode="keep", basis="random", window=4)
    res = Trainer(model, task, TrainConfig(steps=8, batch_size=32, eval_every=4, checkpoint_every=0),
                  [cap, proj], progress=False).fit()
    assert res.steps == 8 and 0 <= res.final["test/acc"] <= 1
    assert "sed/task_gradient/add/sigma_1" in res.history[-1]
    assert cap.bases()["gradient"]["directions"].device.type == "cpu"
    grads = capture_task_gradients(model, task, ParamSubspace.attention(model))
    assert grads["add"].device.type == device


@pytest.mark.parametrize("device", ACCELERATORS)
@pytest.mark.parametrize("method", ["jvp", "hvp", "fd"])
def test_accelerator_coupling_matches_cpu(device, method):
    task, cpu_model = tiny()
    _, model = tiny(device=device)
    model.load_state_dict(cpu_model.state_dict())
    probes = task.probes(32, seed=0)
    out = {}
    for m in (cpu_model, model):
        S = ParamSubspace.attention(m)
        dirs = S.random_directions(2, torch.Generator().manual_seed(1))
        out[model_device(m).type] = (coupling(m, S, dirs, probes, n_random=4, method=method).A,
                                     centroids(m, *probes).cpu())
    torch.testing.assert_close(out[device][0], out["cpu"][0], rtol=1e-3, atol=1e-6)
    torch.testing.assert_close(out[device][1], out["cpu"][1], rtol=1e-4, atol=1e-5)
