"""torchrun on CPU with Gloo, 2 processes: DDP and FSDP2 equal one process; FSDP checkpoints reshard."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from gptkit import checkpoint

TORCHRUN = shutil.which("torchrun") or os.path.join(os.path.dirname(sys.executable), "torchrun")
COMMON = ["--preset", "tiny-gpt2", "model.n_layer=2", "model.n_embd=32", "model.n_head=2", "model.context=32",
          "batch_size=4", "log_interval=1", "eval_interval=3", "ckpt_interval=3", "warmup_steps=2"]


@pytest.fixture
def data(cat_data):
    return cat_data


def gptkit_train(out, data, *args, procs=1):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launcher = [TORCHRUN, "--nproc-per-node", str(procs), "-m"] if procs > 1 else [sys.executable, "-m"]
    r = subprocess.run([*launcher, "gptkit", "train", "--data", str(data), "--out", str(out), *COMMON, *args],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    return r


def losses(run) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
            if "loss" in r]


def test_ddp_and_fsdp_match_one_process(data, tmp_path):
    gptkit_train(tmp_path / "one", data, "--max-steps", "6")
    gptkit_train(tmp_path / "ddp", data, "--max-steps", "6", procs=2)
    gptkit_train(tmp_path / "fsdp", data, "--max-steps", "6", "strategy=fsdp", procs=2)
    one = losses(tmp_path / "one")
    assert len(one) == 6
    for other in ("ddp", "fsdp"):
        for (s1, a), (s2, b) in zip(one, losses(tmp_path / other), strict=True):
            assert s1 == s2 and a == pytest.approx(b, abs=1e-5)
    assert [p.name for p in (tmp_path / "fsdp").glob("dcp*")] == ["dcp-00000006"]
    checkpoint.load_model(tmp_path / "fsdp")  # the single-file export loads in one process


def test_fsdp_checkpoint_resumes_in_one_and_two_processes(data, tmp_path):
    gptkit_train(tmp_path / "base", data, "--max-steps", "3", "strategy=fsdp", procs=2)
    for procs in (1, 2):
        shutil.copytree(tmp_path / "base", tmp_path / f"r{procs}")
        gptkit_train(tmp_path / f"r{procs}", data, "--max-steps", "6", "--resume", "strategy=fsdp", procs=procs)
    a, b = losses(tmp_path / "r1"), losses(tmp_path / "r2")
    assert [s for s, _ in a] == [1, 2, 3, 4, 5, 6] == [s for s, _ in b]
    assert a[:3] == losses(tmp_path / "base")
    for (_, x), (_, y) in zip(a, b):
        assert x == pytest.approx(y, abs=1e-5)


def test_bad_distributed_settings(data, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([TORCHRUN, "--nproc-per-node", "2", "-m", "gptkit", "train", "--data", str(data), "--out",
                        str(tmp_path / "x"), *COMMON, "--max-steps", "2", "batch_size=3"],
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode != 0 and "not divisible by the world size 2" in r.stderr
    gptkit_train(tmp_path / "ddp", data, "--max-steps", "3", procs=2)
    r = subprocess.run([sys.executable, "-m", "gptkit", "train", "--data", str(data), "--out", str(tmp_path / "ddp"),
                        *COMMON, "--max-steps", "6", "--resume", "strategy=fsdp"], capture_output=True, text=True,
                       env=env, timeout=120)
    assert r.returncode == 1 and "with strategy fsdp" in r.stderr


RANK_PREPARES = """
import os, sys, time
from gptkit.data import Document
from gptkit.train import trainer

real_prepare = trainer.prepare

def prepare(docs, out, **kw):  # the real one, slowed: a rank that did not wait would start inside it
    start = time.time()
    time.sleep(1)
    result = real_prepare(docs, out, **kw)
    with open(os.path.join(os.environ["GPTKIT_CACHE"], "calls"), "a") as f:
        f.write(f"{os.environ['RANK']} {start} {time.time()}\\n")
    return result

trainer.prepare = prepare
trainer.embedded_corpus = lambda: iter([Document("tiny", "def f(x):\\n    return x + 1\\n" * 400)])
from gptkit.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_without_data_rank_0_prepares_the_corpus_while_the_others_wait(tmp_path):
    (tmp_path / "launch.py").write_text(RANK_PREPARES)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GPTKIT_CACHE": str(tmp_path)}
    r = subprocess.run([TORCHRUN, "--nproc-per-node", "2", str(tmp_path / "launch.py"), "train", "--out",
                        str(tmp_path / "run"), *COMMON, "--max-steps", "2"], capture_output=True, text=True, env=env,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    calls = {rank: (float(start), float(end)) for rank, start, end in
             map(str.split, (tmp_path / "calls").read_text().splitlines())}
    assert calls["1"][0] >= calls["0"][1]  # rank 1 looked only after rank 0 had prepared the corpus
    assert (tmp_path / "run" / "model.safetensors").exists()


def test_an_fsdp_crash_between_shards_and_state_resumes_the_previous_checkpoint_whole(data, tmp_path):
    """A crash after step 6's shards landed but before its train_state.pt did (and a leftover dcp.old): the
    resumed run continues from step 3 as an uninterrupted one does, not from step-6 weights with step-3 state."""
    gptkit_train(tmp_path / "base", data, "--max-steps", "3", "strategy=fsdp", procs=2)
    shutil.copytree(tmp_path / "base", tmp_path / "whole")
    gptkit_train(tmp_path / "whole", data, "--max-steps", "6", "--resume", "strategy=fsdp", procs=2)
    shutil.copytree(tmp_path / "whole" / "dcp-00000006", tmp_path / "base" / "dcp-00000006")  # the crash
    (tmp_path / "base" / "dcp.old").mkdir()
    gptkit_train(tmp_path / "base", data, "--max-steps", "6", "--resume", "strategy=fsdp", procs=2)
    for (s1, a), (s2, b) in zip(losses(tmp_path / "whole"), losses(tmp_path / "base"), strict=True):
        assert s1 == s2 and a == pytest.approx(b, abs=1e-6)
    assert [p.name for p in (tmp_path / "base").glob("dcp*")] == ["dcp-00000006"]
