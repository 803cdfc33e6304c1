"""Training on a small subset: loss falls, checkpoints reload exactly, kills resume exactly."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import DATA, ROOT, TORCHRUN, needs_data
from visattn.checkpoint import load_checkpoint
from visattn.errors import TrainingError
from visattn.train import TrainConfig, train

pytestmark = needs_data()
TINY = {"widths": (8, 16, 16), "heads": 2}


def cfg(out: Path, **kw) -> TrainConfig:
    base = dict(model="sa_cnn", model_config=TINY, data=str(DATA), out=str(out), epochs=2, batch_size=128,
                subset=1024, eval_subset=200, lr=0.2, log_every=2)
    return TrainConfig(**{**base, **kw})


def cli(*args: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "visattn", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_loss_falls_and_checkpoint_reloads_exactly(tmp_path: Path) -> None:
    model, meta = train(cfg(tmp_path / "a.safetensors", epochs=3))
    lines = [json.loads(l) for l in (tmp_path / "a.metrics.jsonl").read_text().splitlines()]
    epochs = [l for l in lines if l["type"] == "epoch"]
    assert len(epochs) == 3 and epochs[-1]["loss"] < epochs[0]["loss"]
    assert lines[0]["step"] == 0 and lines[0]["probe"]  # the untrained model's attention comes first
    assert {"loss", "train_acc", "lr", "img_per_s"} <= set(lines[1])
    assert epochs[-1]["probe"] is not None  # the attention map on the probe image, per epoch
    loaded, meta2 = load_checkpoint(tmp_path / "a.safetensors")
    x = torch.randn(8, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))
    assert meta2["epochs"] == 3 and meta2["classes"][0] == "airplane" and 0 <= meta2["accuracy"] <= 1


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(path)


def test_kill_and_resume_matches_uninterrupted_run(tmp_path: Path) -> None:
    args = ["train", "--model", "sa_cnn", "--set", "widths=(8,16,16)", "--set", "heads=2", "--data", str(DATA),
            "--epochs", "3", "--batch-size", "128", "--subset", "768", "--eval-subset", "100", "--seed", "3"]
    ref = cli(*args, "--out", str(tmp_path / "ref.safetensors"))
    assert ref.wait(timeout=300) == 0, ref.stdout.read()
    out = tmp_path / "run.safetensors"
    p = cli(*args, "--out", str(out))
    state = tmp_path / "run.state.safetensors"
    deadline = time.time() + 300
    while time.time() < deadline and not state.exists():
        time.sleep(0.02)
    os.kill(p.pid, signal.SIGKILL)  # early in epoch 2
    p.wait()
    assert p.returncode == -signal.SIGKILL  # killed, not finished
    load_checkpoint(out)  # whatever moment the kill hit, the checkpoint on disk is whole
    r = cli(*args, "--out", str(out), "--resume")
    assert r.wait(timeout=300) == 0, r.stdout.read()
    a, b = _weights(tmp_path / "ref.safetensors"), _weights(out)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_non_finite_loss_stops_and_keeps_last_checkpoint(tmp_path: Path) -> None:
    out = tmp_path / "n.safetensors"
    train(cfg(out, epochs=1))
    before = out.read_bytes()
    with pytest.raises(TrainingError, match="loss became"):
        train(cfg(out, epochs=1, lr=1e30))
    assert out.read_bytes() == before
    load_checkpoint(out)


def test_unwritable_output_gives_clear_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    p = cli("train", "--set", "widths=(8,16,16)", "--data", str(DATA), "--epochs", "1", "--batch-size", "128",
            "--subset", "256", "--eval-subset", "50", "--out", str(blocker / "sub" / "m.safetensors"))
    assert p.wait(timeout=300) != 0
    text = p.stdout.read()
    assert "Traceback" not in text and "error:" in text


def test_distributed_two_gloo_processes(tmp_path: Path) -> None:
    out = tmp_path / "ddp.safetensors"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [*TORCHRUN, "--nproc_per_node", "2", "-m", "visattn", "train", "--set", "widths=(8,16,16)", "--set",
           "heads=2", "--data", str(DATA), "--epochs", "1", "--batch-size", "64", "--subset", "512", "--eval-subset",
           "100", "--out", str(out)]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    _, meta = load_checkpoint(out)
    assert meta["epochs"] == 1
    steps = [json.loads(l) for l in (tmp_path / "ddp.metrics.jsonl").read_text().splitlines()]
    assert steps[-1]["type"] == "epoch"


# ----------------------------------------------------------------------------- faults: full disk, two runs, one name
def _no_temp_files(folder: Path) -> bool:
    return not [p for p in folder.iterdir() if p.name.endswith(".tmp")]


def test_full_disk_keeps_previous_checkpoint(tmp_path: Path, monkeypatch) -> None:
    """A disk that fills while a checkpoint is written (ENOSPC from the kernel at fsync,
    where a full disk shows itself for buffered writes): a clear error, the previous
    checkpoint unchanged and loadable, no temporary file left."""
    import errno

    from visattn import checkpoint
    from visattn.errors import WriteError

    out = tmp_path / "m.safetensors"
    train(cfg(out, epochs=1, subset=256, eval_subset=50))
    before = out.read_bytes()

    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(checkpoint.os, "fsync", full)
    with pytest.raises(WriteError, match="No space left on device.*previous file is unchanged"):
        train(cfg(out, epochs=1, subset=256, eval_subset=50, seed=5))
    assert out.read_bytes() == before and _no_temp_files(tmp_path)
    load_checkpoint(out)


@pytest.fixture
def tiny_disk(tmp_path: Path):
    """A real 512 KiB file system (tmpfs); skipped where mounting is not permitted."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs", str(mnt)], capture_output=True)
    if r.returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root): the fault-injection test covers a full disk")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_full_disk_for_real_from_the_cli(tiny_disk: Path) -> None:
    """On a real full file system: a tiny checkpoint fits, the default model's (4.6 MB)
    does not; the CLI says so in one line, keeps the tiny one and leaves no temp file."""
    out = tiny_disk / "m.safetensors"
    base = ["train", "--data", str(DATA), "--epochs", "1", "--batch-size", "128", "--subset", "256",
            "--eval-subset", "50", "--out", str(out)]
    small = cli(*base, "--set", "widths=(8,16,16)", "--set", "heads=2")
    assert small.wait(timeout=300) == 0, small.stdout.read()
    before = out.read_bytes()
    (tiny_disk / "m.state.safetensors").unlink()  # keep room only for the failed write to fill
    big = cli(*base)
    assert big.wait(timeout=300) == 2
    text = big.stdout.read()
    assert "Traceback" not in text and "No space left on device" in text, text
    assert out.read_bytes() == before and _no_temp_files(tiny_disk)
    load_checkpoint(out)


def test_two_runs_with_one_output_name_do_not_mix(tmp_path: Path) -> None:
    """While a run writes OUT, a second run on OUT is refused with one line (it would
    interleave checkpoints, state and metrics); a SIGKILLed run's lock does not outlive it."""
    out = tmp_path / "same.safetensors"
    args = ["train", "--set", "widths=(8,16,16)", "--set", "heads=2", "--data", str(DATA), "--batch-size", "128",
            "--eval-subset", "50", "--out", str(out)]
    first = cli(*args, "--epochs", "30", "--subset", "4096")
    lock = tmp_path / "same.safetensors.lock"
    deadline = time.time() + 120
    while time.time() < deadline and not lock.exists():
        time.sleep(0.05)
    second = cli(*args, "--epochs", "1", "--subset", "256")
    assert second.wait(timeout=120) == 2
    assert first.poll() is None, "the first run ended before the second started: the test proves nothing"
    text = second.stdout.read()
    assert "another run is writing" in text and "Traceback" not in text, text
    assert lock.read_text().strip() == str(first.pid)
    deadline = time.time() + 300
    while time.time() < deadline and not (tmp_path / "same.state.safetensors").exists():
        time.sleep(0.05)
    os.kill(first.pid, signal.SIGKILL)
    first.wait()
    epochs = [json.loads(l) for l in (tmp_path / "same.metrics.jsonl").read_text().splitlines()]
    assert {e["epoch"] for e in epochs} <= set(range(1, 31)) and all(e.get("epochs", 30) == 30 for e in epochs)
    third = cli(*args, "--epochs", "30", "--subset", "4096", "--resume", "--stop-after", "1")
    assert third.wait(timeout=300) == 0, third.stdout.read()  # the kill freed the lock
    assert not lock.exists()
    load_checkpoint(out)


def test_lookahead_run_resumes_exactly_and_ends_on_its_average(tmp_path: Path) -> None:
    """With airbench's lookahead on, a run stopped after one epoch and resumed ends with the same
    weights as one run straight through (the average travels in the state file), and the
    recipe is recorded in the checkpoint."""
    kw = dict(epochs=2, subset=768, eval_subset=100, lookahead=0.95, seed=5)
    train(cfg(tmp_path / "ref.safetensors", **kw))
    train(cfg(tmp_path / "run.safetensors", stop_after=1, **kw))
    assert any(k.startswith("lookahead.") for k in _weights(tmp_path / "run.state.safetensors"))
    _, meta = train(cfg(tmp_path / "run.safetensors", **kw), resume=True)
    a, b = _weights(tmp_path / "ref.safetensors"), _weights(tmp_path / "run.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert meta["train_config"]["lookahead"] == 0.95 and meta["epochs"] == 2


def test_lookahead_pulls_weights_onto_their_average() -> None:
    from visattn.train import Lookahead

    model = torch.nn.Linear(3, 2)
    la = Lookahead(model, base=0.9)
    start = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    la.step(model, 4, total=10)  # not a 5th step: nothing happens
    assert torch.equal(model.weight, start + 1.0)
    la.step(model, 5, total=10)
    d = 0.9**5 * 0.5**3
    assert torch.allclose(model.weight, d * start + (1 - d) * (start + 1.0))
    with torch.no_grad():
        model.weight.add_(1.0)
    la.step(model, 10, total=10)  # the last step takes the average as it is
    assert torch.allclose(model.weight, d * start + (1 - d) * (start + 1.0))


def test_flips_alternate_from_the_first_epoch() -> None:
    from visattn.train import flip_mask

    masks = [flip_mask(1000, seed=7, epoch=e) for e in range(4)]
    assert 400 < int(masks[0].sum()) < 600
    assert bool((masks[0] ^ masks[1]).all()) and torch.equal(masks[0], masks[2]) and torch.equal(masks[1], masks[3])


def test_translate_tta_is_airbench_six_views() -> None:
    """``predict_logits`` with "translate" is the weighted mean of the six views, recomputed here."""
    import torch.nn.functional as F

    from visattn.models import create_model
    from visattn.train import predict_logits

    torch.manual_seed(0)
    model = create_model("sa_cnn", **TINY).eval()
    model.head.scale = 1000.0  # logits of order one, so the tolerances below mean something
    images = torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8)
    mean, std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    x = (images.float() / 255 - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]
    with torch.no_grad():
        def both(v: torch.Tensor) -> torch.Tensor:
            return (model(v) + model(v.flip(-1))) / 2
        padded = F.pad(x, (1, 1, 1, 1), mode="reflect")
        expected = both(x) / 2 + both(padded[..., :32, :32]) / 4 + both(padded[..., 2:, 2:]) / 4
    got = predict_logits(model, images, mean, std, batch_size=4, tta="translate")
    assert expected.abs().mean() > 0.1
    assert torch.allclose(got, expected, atol=1e-4)
    assert torch.allclose(predict_logits(model, images, mean, std, tta=True), both(x), atol=1e-4)
    assert not torch.allclose(got, predict_logits(model, images, mean, std), atol=1e-2)
    with pytest.raises(ValueError, match="unknown test-time augmentation"):
        predict_logits(model, images, mean, std, tta="rotate")


def test_weight_decay_spares_norms_gates_and_position_tables() -> None:
    """Decay pulls a relative-position table (and gates, norms, biases) towards zero, that
    is, the attention towards uniform: only conv and linear weights decay."""
    from visattn.models import create_model
    from visattn.train import make_optimizer

    model = create_model("sa_cnn", widths=(8, 16), attn_stages=(0,), stem_stride=2, heads=1, pos_encoding="relative")
    decay, spared, shape = make_optimizer(model, TrainConfig(weight_decay=5e-4)).param_groups
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    assert decay["weight_decay"] == 5e-4 and spared["weight_decay"] == shape["weight_decay"] == 0.0
    assert {names[id(p)] for p in shape["params"]} == {"stages.0.1.rel_bias.table"}  # (dot product: no temperature)
    assert decayed == {n for n, p in model.named_parameters() if p.requires_grad and p.ndim > 1 and "table" not in n}
    assert "stages.0.1.q.weight" in decayed and not any("gate" in n or "norm" in n for n in decayed)


def test_attention_shape_learns_at_its_own_rate() -> None:
    """The temperature and the relative-position table step ``attn_lr_scale`` times as far as
    they would at the plain learning rate, from the same gradient; every other weight steps as before."""
    from visattn.models import create_model
    from visattn.train import make_optimizer, set_lr

    def one_step(scale: float) -> dict[str, torch.Tensor]:
        torch.manual_seed(0)
        model = create_model("sa_cnn", widths=(8, 16), attn_stages=(0,), stem_stride=2, heads=1,
                             similarity="cosine", pos_encoding="relative", temperature_init=1.0)
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        opt = make_optimizer(model, TrainConfig(attn_lr_scale=scale, weight_decay=0.0))
        set_lr(opt, 0.01)
        model(torch.randn(4, 3, 32, 32)).logsumexp(1).mean().backward()
        opt.step()
        return {n: p.detach() - before[n] for n, p in model.named_parameters()}

    plain, fast = one_step(1.0), one_step(250.0)
    for name in ("stages.0.1.log_temperature", "stages.0.1.rel_bias.table"):
        assert plain[name].abs().max() > 0
        torch.testing.assert_close(fast[name], 250.0 * plain[name], rtol=1e-4, atol=1e-9)
    torch.testing.assert_close(fast["stages.0.1.q.weight"], plain["stages.0.1.q.weight"])


def test_optimiser_state_resumes_by_parameter_name(tmp_path: Path) -> None:
    """The saved momentum of each parameter comes back on that parameter, whatever order the
    optimiser groups them in; a file keyed by position in another grouping is refused in one line."""
    from visattn.checkpoint import tensors_to_bytes
    from visattn.models import create_model
    from visattn.train import load_state, make_optimizer, save_state, set_lr

    torch.manual_seed(0)
    kw = dict(widths=(8, 16), attn_stages=(0,), stem_stride=2, heads=1, similarity="cosine", pos_encoding="relative")
    model, config = create_model("sa_cnn", **kw), TrainConfig(attn_lr_scale=10.0)
    opt = make_optimizer(model, config)
    set_lr(opt, 0.01)
    model(torch.randn(4, 3, 32, 32)).logsumexp(1).mean().backward()
    opt.step()
    momentum = {n: opt.state[p]["momentum_buffer"].clone() for n, p in model.named_parameters()
                if "momentum_buffer" in opt.state.get(p, {})}  # (parameters without a gradient have none)
    assert {"stages.0.1.log_temperature", "stages.0.1.rel_bias.table", "stages.0.1.q.weight"} <= set(momentum)
    save_state(tmp_path / "s.safetensors", model, opt, 1, config, {})

    again = create_model("sa_cnn", **kw)
    reordered = make_optimizer(again, config)
    reordered.param_groups.reverse()  # another grouping order: positions no longer match
    assert load_state(tmp_path / "s.safetensors", again, reordered)[0] == 1
    for n, p in again.named_parameters():
        if n in momentum:
            assert torch.equal(reordered.state[p]["momentum_buffer"], momentum[n])
        else:
            assert p not in reordered.state

    # before attention's shape had its own group, the state was keyed by position in two groups
    decayed = {id(p) for p in opt.param_groups[0]["params"]}
    old_order = opt.param_groups[0]["params"] + [p for p in model.parameters()
                                                 if p.requires_grad and id(p) not in decayed]
    tensors = {k: v for k, v in load_file(tmp_path / "s.safetensors").items() if not k.startswith("optim/")}
    tensors.update({f"opt.{i}.momentum_buffer": opt.state[p]["momentum_buffer"] for i, p in enumerate(old_order)
                    if p in opt.state})
    (tmp_path / "old.safetensors").write_bytes(tensors_to_bytes(tensors, {"epoch": 1, "train": {}, "log": {}}))
    with pytest.raises(TrainingError, match="saved by an older visattn") as e:
        load_state(tmp_path / "old.safetensors", again, make_optimizer(again, config))
    assert "\n" not in str(e.value)
