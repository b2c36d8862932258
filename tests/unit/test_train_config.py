"""Training configs (training/config.py), corpus files (training/data.py) and the `membank train`
command's one-line errors."""
import json

import pytest

from membank_cli.cli import main
from training.config import TrainConfig, load_train_config
from training.data import read_jsonl_corpus


def test_defaults_are_the_papers_recipe_and_demo_keeps_cpu_rates():
    tc = TrainConfig()
    assert (tc.anchor_lr, tc.anchor_wd, tc.memory_lr, tc.memory_min_lr, tc.memory_wd,
            tc.grad_clip) == (5e-3, 0.05, 1e-4, 1e-5, 1e-3, 1.0)
    assert (tc.beta1, tc.beta2) == (0.9, 0.95) and tc.generic_prob == 1 / 17
    demo = load_train_config("demo")
    assert demo.memory_lr == 3e-3 and demo.anchor_steps == demo.cotrain_steps == 300
    assert load_train_config("paper-410m").preset == "paper-410m"   # any model preset works


def test_file_with_extends_and_overrides(tmp_path):
    f = tmp_path / "run.json"
    f.write_text(json.dumps({"extends": "tiny", "cotrain_steps": 7, "memory": {"ranks": [4, 2]}}))
    tc = load_train_config(str(f), ["model.n_layer=3", "memory_lr=1e-3", "version=2",
                                    "subtree=null"])
    assert (tc.cotrain_steps, tc.memory_lr, tc.version, tc.anchor_steps) == (7, 1e-3, "2", 20)
    config = tc.model_config()
    assert config.model.n_layer == 3 and config.memory.ranks == (4, 2)


@pytest.mark.parametrize("source, overrides, message", [
    ("nope", [], "unknown config 'nope'"),
    ("tiny", ["bogus=1"], "unknown training option 'bogus'"),
    ("tiny", ["model.bogus=1"], "unknown ModelConfig field"),
    ("tiny", ["batch_size=many"], "'batch_size' in --set must be int"),
    ("tiny", ["batch_size=0"], "batch_size must be > 0"),
    ("tiny", ["model.n_head=3"], "d_model 32 is not divisible by n_head 3"),
    ("tiny", ["seq_len=100"], "seq_len 100 exceeds the model's max_seq_len 64"),
    ("tiny", ["memory.layers=[5]"], "memory layers [5] are outside"),
    ("tiny", ["generic_prob=1"], "generic_prob must be in [0, 1)"),
    ("tiny", ["subtree=0"], "frozen-anchor phase only"),
    ("tiny", ["subtree=2", "anchor_steps=0", "cotrain_steps=0", "frozen_steps=1", "init_from=x"],
     "subtree 2 is outside 0..1"),
    ("tiny", ["anchor_steps=0", "cotrain_steps=0"], "nothing to train"),
])
def test_bad_configs_name_the_problem(source, overrides, message):
    with pytest.raises(ValueError) as e:
        load_train_config(source, overrides)
    assert message in str(e.value)


def test_bad_config_files(tmp_path):
    (tmp_path / "latin1.json").write_bytes(b'{"seed": "\xe9"}')
    (tmp_path / "list.json").write_text("[1, 2]")
    (tmp_path / "field.json").write_text('{"learning_rate": 1}')
    for name, message in [("latin1.json", "not UTF-8"), ("list.json", "JSON object"),
                          ("field.json", "unknown training option 'learning_rate'")]:
        with pytest.raises(ValueError, match=message):
            load_train_config(str(tmp_path / name))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_train_config(str(tmp_path / "missing.json"))


def test_jsonl_corpus(tmp_path):
    good = tmp_path / "good.jsonl"
    good.write_text('{"text": "Ruthenium is a metal."}\n\n{"text": "Neon glows."}\n{"text": ""}\n')
    assert read_jsonl_corpus(good) == ["Ruthenium is a metal.", "Neon glows."]
    cases = {"empty.jsonl": (b"", "is empty"), "blank.jsonl": (b'{"text": "  "}\n', "is empty"),
             "latin1.jsonl": (b'{"text": "ok"}\n{"text": "caf\xe9"}\n', "not UTF-8 (line 2"),
             "notjson.jsonl": (b'{"text": "ok"}\nnot json\n', "line 2 is not JSON"),
             "notext.jsonl": (b'{"body": "x"}\n', 'line 1 is not an object with a string "text"')}
    for name, (content, message) in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(ValueError, match=message.replace("(", r"\(")):
            read_jsonl_corpus(tmp_path / name)


def test_cli_train_errors_are_one_line(tmp_path, capsys):
    (tmp_path / "empty.jsonl").write_bytes(b"")
    (tmp_path / "bad.jsonl").write_bytes(b"\xff\xfe")
    cases = [(["--config", "nope"], "unknown config 'nope'"),
             (["--config", "tiny", "--set", "nope=1"], "unknown training option 'nope'"),
             (["--config", "tiny", "--set", "model.d_model=33"], "not divisible"),
             (["--config", "tiny", "--corpus", str(tmp_path / "empty.jsonl")], "is empty"),
             (["--config", "tiny", "--corpus", str(tmp_path / "bad.jsonl")], "not UTF-8"),
             (["--config", "tiny", "--corpus", str(tmp_path / "missing.jsonl")], "does not exist"),
             (["--config", "tiny", "--resume"], "nothing to resume")]
    for args, message in cases:
        with pytest.raises(SystemExit) as e:
            main(["train", "--out", str(tmp_path / "run"), *args])
        err = capsys.readouterr().err
        assert e.value.code == 2 and message in err and err.count("\n") == 1, err
