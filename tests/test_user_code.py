"""Your own model, data and loss (fast tier): the import-string resolver, the loss shape check, the data
adapters (tensors, tuples, dicts; a Dataset read by index equals tensor indexing; IterableDataset refused),
predict's choice of model for --from-run, the thread default, and fit's option check."""

import json

import pytest
import torch
from torch import nn
from torch.utils.data import Dataset as TorchDataset
from torch.utils.data import IterableDataset, TensorDataset

from scalesgd.config import RunConfig
from scalesgd.data.user import concat_batches, from_user, read_batch, split_batch
from scalesgd.distributed import World
from scalesgd.errors import ConfigError, DataError
from scalesgd.user_code import (PerExampleLoss, build_run_model, call_with_accepted, canonical, is_import_string,
                                loss_for, resolve, short_name)

USER_FILE = """
import torch
from torch import nn

NOT_A_FUNCTION = 3

def make_model(*, input_shape, num_outputs, width=4):
    return nn.Sequential(nn.Flatten(), nn.Linear(input_shape[0], width), nn.ReLU(), nn.Linear(width, num_outputs))

def not_a_model(**kwargs):
    return [1, 2]

def per_example(out, y):
    return nn.functional.cross_entropy(out, y, reduction="none")

def mean_loss(out, y):
    return nn.functional.cross_entropy(out, y)
"""


@pytest.fixture()
def user_file(tmp_path):
    path = tmp_path / "own.py"
    path.write_text(USER_FILE)
    return path


@pytest.mark.parametrize("spec, expected", [
    ("mypkg.models:make_model", True), ("own.py:make_model", True), ("dir/sub/own.py:f", True),
    ("idx:/data/mnist", False), ("cifar10:/data/cifar", False), ("mnist1d", False), ("cnn1d", False),
    ("mypkg.models:", False), ("mypkg models:f", False), (None, False), ("a.b:not-a-name", False),
])
def test_is_import_string(spec, expected):
    assert is_import_string(spec) is expected


def test_resolve_file_and_module(user_file):
    fn = resolve(f"{user_file}:make_model", option="--model")
    model = fn(input_shape=(3,), num_outputs=2)
    assert isinstance(model, nn.Module)
    # the same file loaded twice is the same module (every process and pickle agree on its name)
    assert resolve(f"{user_file}:make_model", option="--model") is fn
    from scalesgd.models import mlp

    assert resolve("scalesgd.models:mlp", option="--model") is mlp


@pytest.mark.parametrize("spec_tail, message", [
    ("missing.py:f", "does not exist"),
    ("own.py:nothere", "has no function 'nothere'"),
    ("own.py:NOT_A_FUNCTION", "not a function"),
])
def test_resolve_errors_name_the_problem(user_file, spec_tail, message):
    spec = f"{user_file.parent}/{spec_tail}"
    with pytest.raises(ConfigError, match=message) as err:
        resolve(spec, option="--model")
    assert "\n" not in str(err.value) and "--model" in str(err.value)


def test_resolve_missing_module():
    with pytest.raises(ConfigError, match="module 'no_such_pkg_xyz' not found"):
        resolve("no_such_pkg_xyz.models:f", option="--dataset")


def test_call_with_accepted_passes_only_what_the_signature_takes():
    seen = {}

    def narrow(*, num_outputs, width=3):
        seen.update(num_outputs=num_outputs, width=width)

    call_with_accepted(narrow, input_shape=(2,), num_outputs=5, dropout=0.1)
    assert seen == {"num_outputs": 5, "width": 3}

    def wide(**kwargs):
        seen.clear()
        seen.update(kwargs)

    call_with_accepted(wide, input_shape=(2,), num_outputs=5)
    assert seen == {"input_shape": (2,), "num_outputs": 5}

    def needs(*, input_shape, special):
        pass

    with pytest.raises(ConfigError, match="requires argument 'special'"):
        call_with_accepted(needs, what="--model x.py:needs", input_shape=(2,))
    with pytest.raises(ConfigError, match="num_outputs.*unknown here.*num_outputs` attribute"):
        call_with_accepted(lambda *, num_outputs: None, num_outputs=None)


def test_a_model_option_the_factory_does_not_take_is_refused_not_dropped(user_file):
    # make_model takes width but no dropout: --dropout 0.1 would train without dropout, silently
    with pytest.raises(ConfigError, match="takes no 'dropout' argument, so --dropout 0.1 would be ignored") as e:
        build_run_model(RunConfig(model=f"{user_file}:make_model", dropout=0.1), input_shape=(5,), num_outputs=2)
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="takes no 'norm' argument"):
        build_run_model(RunConfig(model=f"{user_file}:make_model", norm="group"), input_shape=(5,), num_outputs=2)
    build_run_model(RunConfig(model=f"{user_file}:make_model", width=6), input_shape=(5,), num_outputs=2)  # taken
    with pytest.raises(ConfigError, match="returned a list"):  # **kwargs takes dropout: past the check
        build_run_model(RunConfig(model=f"{user_file}:not_a_model", dropout=0.1), input_shape=(5,), num_outputs=2)


def test_build_run_model_import_string_seeded_and_typed(user_file):
    cfg = RunConfig(model=f"{user_file}:make_model", width=6, seed=3)
    a = build_run_model(cfg, input_shape=(5,), num_outputs=2)
    b = build_run_model(cfg, input_shape=(5,), num_outputs=2)
    assert a[1].out_features == 6  # --width reached the factory
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))  # seeded from cfg.seed
    with pytest.raises(ConfigError, match="returned a list, not a torch.nn.Module"):
        build_run_model(RunConfig(model=f"{user_file}:not_a_model"), input_shape=(5,), num_outputs=2)
    with pytest.raises(ConfigError, match="cannot be rebuilt"):
        build_run_model(RunConfig(model="object:Net"), input_shape=(5,), num_outputs=2)


def test_loss_shape_is_checked_and_summed(user_file):
    out, y = torch.randn(4, 3), torch.tensor([0, 2, 1, 1])
    ref = nn.functional.cross_entropy(out, y, reduction="none")
    total = loss_for(f"{user_file}:per_example", "classification")(out, y)
    assert torch.allclose(total, ref.sum())
    assert torch.allclose(loss_for(f"{user_file}:per_example", "classification", "none")(out, y), ref)
    with pytest.raises(ConfigError, match=r"returned shape \(\) for a batch of 4.*shape \(4,\)"):
        loss_for(f"{user_file}:mean_loss", "classification")(out, y)
    with pytest.raises(ConfigError, match=r"returned shape \(4, 3\)"):
        PerExampleLoss(lambda o, t: o, what="the loss")(out, y)


def test_default_loss_is_cross_entropy_or_half_squared_error():
    out, y = torch.randn(4, 3), torch.tensor([0, 2, 1, 1])
    assert torch.allclose(loss_for(None, "classification")(out, y), nn.functional.cross_entropy(out, y, reduction="sum"))
    target = torch.randn(4, 3)
    assert torch.allclose(loss_for(None, "regression", "none")(out, target), 0.5 * (out - target).pow(2).sum(1))


def test_config_accepts_import_strings_and_rejects_a_bad_loss():
    cfg = RunConfig(model="pkg.mod:make", dataset="data.py:make_data", loss="pkg.mod:loss", loader_workers=2)
    assert cfg.model == "pkg.mod:make"
    with pytest.raises(ConfigError, match="--loss 'crossentropy' is not an import string"):
        RunConfig(loss="crossentropy")
    with pytest.raises(ConfigError, match="--model: unknown value 'resnet'"):
        RunConfig(model="resnet")
    with pytest.raises(ConfigError, match="--loader-workers"):
        RunConfig(loader_workers=-1)


def test_toml_configs_take_import_strings(tmp_path):
    from scalesgd.config import config_from_mapping, load_toml

    path = tmp_path / "run.toml"
    path.write_text('model = "own.py:make_model"\ndataset = "pkg.data:make"\nloss = "own.py:loss"\n'
                    'loader-workers = 2\n')
    cfg = RunConfig(**config_from_mapping(load_toml(path, what="config file"), source=str(path)))
    assert (cfg.model, cfg.dataset, cfg.loss, cfg.loader_workers) == ("own.py:make_model", "pkg.data:make",
                                                                       "own.py:loss", 2)


def test_canonical_and_short_names(tmp_path):
    assert canonical("pkg.mod:f") == "pkg.mod:f"
    assert canonical("mnist1d") == "mnist1d"
    assert canonical("rel/own.py:f").startswith("/") and canonical("rel/own.py:f").endswith("rel/own.py:f")
    assert short_name("/a/b/own.py:make_model") == "own.make_model"
    assert short_name("pkg.mod:f") == "mod.f"
    assert short_name("idx:/data/mnist") == "idx"


# --- data adapters ---------------------------------------------------------------------------------------


class PairSet(TorchDataset):
    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], self.y[i]


class DictSet(PairSet):
    num_outputs = 3

    def __getitem__(self, i):
        return {"input": self.x[i], "mask": torch.ones(2), "target": self.y[i]}


def _tensors(n=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, generator=g), torch.randint(0, 3, (n,), generator=g)


def test_tensors_stay_in_memory_and_set_the_task():
    x, y = _tensors()
    ds = from_user((x, y), (x[:5], y[:5]), name="t")
    assert ds.in_memory and ds.task == "classification" and ds.n_train == 20 and ds.n_test == 5
    assert ds.num_outputs == int(y.max()) + 1 and ds.input_shape == (4,)
    reg = from_user(TensorDataset(x, x[:, :2]), (x, x[:, :2]), name="r")  # a TensorDataset of two is tensors too
    assert reg.in_memory and reg.task == "regression" and reg.num_outputs == 2


def test_dataset_by_index_equals_tensor_indexing():
    x, y = _tensors()
    by_index = from_user(PairSet(x, y), PairSet(x[:5], y[:5]), name="p")
    assert not by_index.in_memory and by_index.n_train == 20 and by_index.input_shape == (4,)
    idx = torch.tensor([7, 3, 19, 0, 3])
    bx, by = by_index.train_batch(idx)
    assert torch.equal(bx, x[idx]) and torch.equal(by, y[idx])
    tx, ty = by_index.test_batch(torch.tensor([4, 1]))
    assert torch.equal(tx, x[[4, 1]]) and torch.equal(ty, y[[4, 1]])


def test_dict_examples_give_the_model_the_dict_and_the_loss_the_target():
    x, y = _tensors()
    ds = from_user(DictSet(x, y), DictSet(x, y), name="d")
    assert ds.num_outputs == 3 and ds.input_shape is None  # dict examples: no single input shape
    inputs, target = ds.train_batch(torch.tensor([2, 5]))
    assert isinstance(inputs, dict) and torch.equal(inputs["input"], x[[2, 5]]) and inputs["mask"].shape == (2, 2)
    assert torch.equal(target, y[[2, 5]])
    with pytest.raises(DataError, match="'target' key"):
        split_batch({"input": x[:2]})


def test_iterable_dataset_refused_with_the_reason():
    class Stream(IterableDataset):
        def __iter__(self):
            yield torch.zeros(2), 0

    with pytest.raises(DataError, match="IterableDataset.*batch size can change mid-epoch"):
        from_user(Stream(), Stream(), name="s")


def test_bad_data_shapes_are_one_line_errors():
    x, y = _tensors()
    with pytest.raises(DataError, match="20 inputs but 19 targets"):
        from_user((x, y[:19]), (x, y), name="b")
    with pytest.raises(DataError, match="must hold two tensors"):
        from_user((x, y, y), (x, y), name="b")
    with pytest.raises(DataError, match="give a tuple of tensors"):
        from_user(42, (x, y), name="b")


def test_concat_batches_equals_collating_the_whole():
    x, y = _tensors()
    ds = DictSet(x, y)
    whole = read_batch(ds, range(6))[0]
    parts = concat_batches([read_batch(ds, range(0, 4))[0], read_batch(ds, range(4, 6))[0]])
    assert all(torch.equal(whole[k], parts[k]) for k in whole)


# --- threads, predict's model, fit's options ---------------------------------------------------------------


@pytest.mark.parametrize("local, cores, expected", [(3, 2, 1), (2, 2, 1), (1, 8, 8), (2, 8, 4), (16, 8, 1)])
def test_threads_default_to_a_share_of_the_cores_at_least_one(local, cores, expected):
    from scalesgd.run import _threads

    world = World(rank=0, size=local, local_rank=0, device=torch.device("cpu"), backend="gloo", local_size=local,
                  cpu_count=cores)
    assert _threads(RunConfig(workers=local), world) == expected
    assert _threads(RunConfig(workers=local, threads_per_worker=5), world) == 5


def test_predict_from_run_uses_the_runs_model_and_refuses_a_contradiction(tmp_path):
    from scalesgd.predict import model_config

    cfg = RunConfig(model="mlp", dataset="digits", width=16, global_batch_size=32, workers=2)
    (tmp_path / "config.json").write_text(json.dumps(cfg.to_dict()))
    (tmp_path / "metrics.jsonl").write_text("")
    got = model_config(tmp_path, model=None, dataset=None, n_train=None, width=None, dropout=None, norm=None, seed=0)
    assert (got.model, got.dataset, got.width) == ("mlp", "digits", 16)
    assert model_config(tmp_path, model="mlp", dataset=None, n_train=None, width=16, dropout=None, norm=None,
                        seed=0).model == "mlp"  # agreeing flags are fine
    with pytest.raises(ConfigError, match="trained model 'mlp', but --model 'cnn1d' was given"):
        model_config(tmp_path, model="cnn1d", dataset=None, n_train=None, width=None, dropout=None, norm=None, seed=0)
    default = model_config(None, model=None, dataset=None, n_train=None, width=None, dropout=None, norm=None, seed=0)
    assert (default.model, default.dataset) == ("cnn1d", "mnist1d")


def test_predict_grid_stops_at_the_training_set(tmp_path, capsys):
    from scalesgd.predict import predict

    predict(model="logreg", dataset="synthetic-logreg", n_train=100, network="10 Gbit/s, 10 us",
            batch_sizes=[16, 32, 64, 128, 256], max_workers=2, batch_bound=20.0, passes_at_small_batch=3.0,
            profile_batch_sizes=(4, 8), profile_steps=1, out=tmp_path)
    rows = (tmp_path / "predictions.csv").read_text().splitlines()
    header = rows[0].split(",")
    col = header.index(next(h for h in header if h.startswith("global_batch")))
    assert max(int(float(r.split(",")[col])) for r in rows[1:]) == 64


def test_fit_rejects_an_unknown_option_before_anything_starts():
    import scalesgd

    x, y = _tensors()
    with pytest.raises(ConfigError, match="unknown option 'global_batch'.*did you mean global_batch_size"):
        scalesgd.fit(nn.Linear(4, 3), (x, y), workers=1, global_batch=8)
    with pytest.raises(ConfigError, match="pass dataset as fit's own argument"):
        scalesgd.fit(nn.Linear(4, 3), (x, y), workers=1, dataset="digits")


def test_fit_records_importable_factories_as_import_strings(user_file):
    from scalesgd.fitting import import_string_of
    from scalesgd.models import mlp

    assert import_string_of(mlp) == "scalesgd.models:mlp"
    from_file = resolve(f"{user_file}:make_model", option="--model")
    assert import_string_of(from_file) == f"{user_file.resolve()}:make_model"
    assert import_string_of(lambda **k: None) is None

    def nested(**kwargs):
        return None

    assert import_string_of(nested) is None
