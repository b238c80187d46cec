"""Calibration over two processes (torch.distributed, gloo): each holds half of the calibration batches and the
block statistics are reduced across them; the model rank 0 writes equals the one-process run's on the same samples
(integer codes, ranges and scales: bit for bit on these models, the float64 Hessian sums included). Strategies that
compute statistics of their own, the search observer and resumable progress are refused with a clear message."""
import os
import socket

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("safetensors")
dist = pytest.importorskip("torch.distributed")
if not dist.is_available():
    pytest.skip("torch.distributed is not available in this torch build", allow_module_level=True)

# (architecture, recipe, strategy, options): static and per-token activations, GPTQ, a LayerNorm shift fold
RUNS = [
    ("llama", "w8a8-static", "osplus", {}),
    ("llama", "w4a8-group", "osplus", {"weight_rounding": "gptq"}),
    ("opt", "w8a8-static", "osplus", {}),
    ("bloom", "w8a8-token", "smoothquant", {}),
    ("qwen2", "w8a8-static", "minmax", {"weight_rounding": "gptq"}),
]
REFUSED = [
    ("llama", "w8a8-static", "os1", {}, "strategy os1 computes statistics of its own"),
    ("llama", "w6a6", "osplus", {}, "the activation observer 'search' needs every calibration token"),
    ("llama", "w8a8-static", "osplus", {"strategy_options": {"shift": "runtime", "shift_quantile": 0.01}},
     "option 'shift_quantile' needs every calibration token in one process"),
    ("llama", "w8a8-static", "osplus", {"batch_size": 8}, "1 calibration batches cannot be shared by 2 processes"),
]


def model_of(kind):
    from tiny_models import build, inject_outliers

    torch.manual_seed(0)
    model = inject_outliers(build(kind), noise=False, up_rows=False)
    model.config.architectures = [type(model).__name__]
    return model.eval()


def quantize_all(root, tag):
    import osengine

    calibration = torch.randint(0, 128, (8, 32), generator=torch.Generator().manual_seed(1))
    for i, (kind, recipe, strategy, options) in enumerate(RUNS):
        options = {"batch_size": 2, "search_batches": 2, **options}
        osengine.quantize(model_of(kind), recipe=recipe, strategy=strategy, calibration=calibration, n_samples=8,
                          seq_len=32, progress=False, out=os.path.join(root, f"{tag}-{i}"), **options)


def worker(rank, world, port, root):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    import osengine

    quantize_all(root, "two")
    calibration = torch.randint(0, 128, (8, 32), generator=torch.Generator().manual_seed(1))
    messages = []
    for kind, recipe, strategy, options, _ in REFUSED:
        try:
            osengine.quantize(model_of(kind), recipe=recipe, strategy=strategy, calibration=calibration,
                              n_samples=8, seq_len=32, progress=False, **{"batch_size": 2, **options})
            messages.append("no error")
        except Exception as e:   # every process refuses, at the same point
            messages.append(f"{type(e).__name__}: {e}")
    with open(os.path.join(root, f"refused-{rank}.txt"), "w") as f:
        f.write("\n".join(messages))
    dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_write_the_one_process_model(tmp_path):
    import torch.multiprocessing as mp
    from safetensors.torch import load_file

    mp.spawn(worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    quantize_all(str(tmp_path), "one")
    for i, run in enumerate(RUNS):
        one = load_file(str(tmp_path / f"one-{i}" / "model.safetensors"))
        two = load_file(str(tmp_path / f"two-{i}" / "model.safetensors"))
        assert one.keys() == two.keys(), run
        assert [k for k in one if not torch.equal(one[k], two[k])] == [], run
    for rank in range(2):
        lines = (tmp_path / f"refused-{rank}.txt").read_text().splitlines()
        assert len(lines) == len(REFUSED)
        for line, (*_, expected) in zip(lines, REFUSED):
            assert expected in line, line


def test_resume_is_refused_with_several_processes(tmp_path, monkeypatch):
    import osengine
    from osengine.calibrate import distributed

    class TwoProcesses(distributed.Reduction):
        world_size, rank = 2, 0

    monkeypatch.setattr("osengine.api.reduction_from_environment", lambda device: TwoProcesses())
    with pytest.raises(ValueError, match="resume=True. is not supported with several processes"):
        osengine.quantize(model_of("llama"), calibration=torch.zeros(8, 32, dtype=torch.long), n_samples=8,
                          seq_len=32, progress=False, out=tmp_path / "q", resume=True)
