"""Your own model, data and loss, end to end (spawning tier): a .py model + data + loss trained by 2 workers,
diversity --checkpoint and predict --from-run rebuilding it, --loader-workers 1 = 0, scalesgd.fit from a
script (and the clear error without a __main__ guard, no hang), and the two examples at a tiny size."""

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from scalesgd.config import RunConfig

pytestmark = pytest.mark.spawn

ROOT = Path(__file__).resolve().parents[1]

USER_FILE = """
import torch
from torch import nn


class Pairs(torch.utils.data.Dataset):
    num_outputs = 3

    def __init__(self, n, seed):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, 6, generator=g)
        self.y = (self.x[:, 0] > 0).long() + (self.x[:, 1] > 0.5).long()

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], self.y[i]


def make_model(*, input_shape, num_outputs, width=8):
    return nn.Sequential(nn.Linear(input_shape[0], width), nn.Tanh(), nn.Linear(width, num_outputs))


def make_data():
    return Pairs(96, 0), Pairs(40, 1)


def make_tensors():
    train, test = make_data()
    return (train.x, train.y), (test.x, test.y)


def smooth_ce(out, y):
    return nn.functional.cross_entropy(out, y, reduction="none", label_smoothing=0.1)
"""


def _python(args, *, cwd, timeout=300, stdin=None):
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          input=stdin)


@pytest.fixture(scope="module")
def own_runs(tmp_path_factory):
    """Three 2-worker runs of a .py model on a map-style Dataset with a .py loss: read in process, through one
    DataLoader worker, and the same examples as tensors."""
    from scalesgd.run import train

    root = tmp_path_factory.mktemp("own")
    (root / "own.py").write_text(USER_FILE)
    base = dict(model=f"{root}/own.py:make_model", loss=f"{root}/own.py:smooth_ce", workers=2, steps=4,
                global_batch_size=16, lr=0.1, diversity="exact", exact_diversity_every=4, progress=False,
                width=5)
    runs = {}
    for name, extra in (("indexed", dict(dataset=f"{root}/own.py:make_data")),
                        ("loader", dict(dataset=f"{root}/own.py:make_data", loader_workers=1)),
                        ("tensors", dict(dataset=f"{root}/own.py:make_tensors"))):
        runs[name] = train(RunConfig(**base, **extra, run_dir=str(root / name)))
    return root, runs


def _params(run_dir):
    return torch.load(Path(run_dir) / "checkpoint.pt", weights_only=True)["model"]


def test_own_model_trains_and_records_its_import_strings(own_runs):
    import json

    root, runs = own_runs
    cfg = json.loads((root / "indexed" / "config.json").read_text())
    assert cfg["model"] == f"{root}/own.py:make_model" and cfg["loss"] == f"{root}/own.py:smooth_ce"
    assert cfg["num_outputs"] == 3 and cfg["n_train"] == 96
    assert runs["indexed"]["steps"] == 4 and runs["indexed"]["final_test_accuracy"] is not None
    assert _params(root / "indexed")["2.weight"].shape == (3, 5)  # --width reached the factory


def test_loader_workers_and_tensors_give_the_same_parameters(own_runs):
    root, _ = own_runs
    ref = _params(root / "indexed")
    for other in ("loader", "tensors"):
        got = _params(root / other)
        assert all(torch.equal(ref[k], got[k]) for k in ref), other


def test_diversity_at_checkpoint_rebuilds_the_runs_own_model(own_runs):
    import json

    from scalesgd.diversity import diversity_at_checkpoint, measure_exact_diversity
    from scalesgd.user_code import resolve

    root, _ = own_runs
    stats = diversity_at_checkpoint(root / "indexed")
    # reference: the same model and loss built by hand, on the tensors, at the checkpoint's weights
    torch.manual_seed(0)
    model = resolve(f"{root}/own.py:make_model", option="--model")(input_shape=(6,), num_outputs=3, width=5)
    model.load_state_dict(_params(root / "indexed"))
    (x, y), _ = resolve(f"{root}/own.py:make_tensors", option="--dataset")()
    loss = resolve(f"{root}/own.py:smooth_ce", option="--loss")
    ref = measure_exact_diversity(model, loss, x, y)
    assert stats["n"] == 96 and stats["step"] == 4
    assert stats["batch_bound"] == pytest.approx(ref["batch_bound"], rel=1e-6)
    logged = [json.loads(line) for line in (root / "indexed" / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in logged if r.get("kind") == "diversity"][-1]  # the trainer's own measurement at step 4
    assert last["batch_bound"] == pytest.approx(ref["batch_bound"], rel=1e-5)


def test_predict_and_report_read_an_import_string_run(own_runs, tmp_path):
    root, _ = own_runs
    cli = [str(Path(sys.executable).with_name("scalesgd"))]
    ok = subprocess.run([*cli, "predict", "--from-run", str(root / "indexed"), "--network", "10 Gbit/s, 10 us",
                         "--batch-bound", "20", "--passes-at-small-batch", "3", "--profile-batch-sizes", "4,8",
                         "--profile-steps", "1", "--max-workers", "2", "--out", str(tmp_path)],
                        cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0, ok.stderr
    assert "make_model" in ok.stdout  # the run's own model was profiled
    bad = subprocess.run([*cli, "predict", "--from-run", str(root / "indexed"), "--model", "mlp"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "--model 'mlp' was given" in bad.stderr and len(bad.stderr.splitlines()) == 1
    report = subprocess.run([*cli, "report", str(root / "indexed"), "--out", str(tmp_path / "rep")], cwd=tmp_path,
                            capture_output=True, text=True, timeout=300)
    assert report.returncode == 0, report.stderr
    assert "own.py:make_model" in (tmp_path / "rep" / "report.md").read_text()


def test_fit_from_a_script_and_the_error_without_a_main_guard(tmp_path):
    done = _python([str(ROOT / "examples" / "own_cnn.py"), "--steps", "2", "--n", "128", "--run-dir",
                    str(tmp_path / "fit")], cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "test accuracy" in done.stdout and (tmp_path / "fit" / "summary.json").is_file()

    # an import-string model from a .py file and tensors from the script: each worker builds the model itself
    (tmp_path / "own.py").write_text(USER_FILE)
    (tmp_path / "by_string.py").write_text(textwrap.dedent(f"""
        import torch
        import scalesgd

        if __name__ == "__main__":
            x = torch.randn(48, 6)
            scalesgd.fit("{tmp_path}/own.py:make_model", (x, (x[:, 0] > 0).long()), loss="{tmp_path}/own.py:smooth_ce",
                         workers=2, steps=2, global_batch_size=8, progress=False, run_dir="{tmp_path}/by_string")
    """))
    done = _python([str(tmp_path / "by_string.py")], cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    import json

    recorded = json.loads((tmp_path / "by_string" / "config.json").read_text())
    assert recorded["model"] == f"{tmp_path}/own.py:make_model" and recorded["loss"] == f"{tmp_path}/own.py:smooth_ce"

    script = textwrap.dedent("""
        import torch
        from torch import nn
        import scalesgd

        class Net(nn.Module):
            def __init__(self):
                super().__init__()
                self.lin = nn.Linear(4, 2)

            def forward(self, x):
                return self.lin(x)

        x = torch.randn(64, 4)
        scalesgd.fit(Net(), (x, (x[:, 0] > 0).long()), workers=2, steps=2, global_batch_size=8, progress=False)
    """)
    (tmp_path / "noguard.py").write_text(script)
    for args, stdin in (([str(tmp_path / "noguard.py")], None), (["-"], script)):
        failed = _python(args, cwd=tmp_path, timeout=60, stdin=stdin)  # a hang would time out here
        last = failed.stderr.strip().splitlines()[-1]
        assert failed.returncode != 0
        assert last.startswith("scalesgd.errors.ConfigError: scalesgd.fit") and "__main__" in last, failed.stderr
    # a guard that does not cover the call: the parent starts workers, each stops at the call with the same
    # advice, and the parent notices the workers that died before reporting (no hang)
    (tmp_path / "halfguard.py").write_text(script + '\nif __name__ == "__main__":\n    pass\n')
    failed = _python([str(tmp_path / "halfguard.py")], cwd=tmp_path, timeout=120)
    assert failed.returncode != 0
    assert "scalesgd.fit was called while a worker process imported your script" in failed.stderr
    assert "worker 0" in failed.stderr.strip().splitlines()[-1] or "worker 1" in failed.stderr.strip().splitlines()[-1]


def test_transformer_example_trains_from_import_strings(tmp_path):
    cli = str(Path(sys.executable).with_name("scalesgd"))
    done = subprocess.run([cli, "train", "--model", "examples/transformer_tokens.py:make_model",
                           "--dataset", "examples/transformer_tokens.py:make_data", "--workers", "2", "--steps", "3",
                           "--global-batch-size", "16", "--diversity", "exact", "--eval-train-examples", "64",
                           "--no-progress", "--run-dir", str(tmp_path / "tok")],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "steps 3" in done.stdout
