"""TrainConfig: YAML + key=value overrides with type conversion, unknown keys and wrong types refused in one line
(exit 2 from the CLI), the effective config written back, every example config valid for its method."""
from __future__ import annotations

import glob
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from slimtune.cli import main
from slimtune.errors import ConfigError
from slimtune.train import TrainConfig, load_config, save_config
from slimtune.train.build import method_config

ROOT = Path(__file__).resolve().parents[1]


def write(tmp_path, text: str) -> Path:
    p = tmp_path / "run.yaml"
    p.write_text(text)
    return p


def test_yaml_and_overrides_convert_types(tmp_path):
    p = write(tmp_path, "data: a.jsonl\nlr: 1e-4\nmax_steps: 10\npacking: false\ntargets: [q_proj, v_proj]\n")
    cfg = load_config(p, ["batch_size=8", "lr=3e-5", "targets=q_proj,k_proj", "grad_ckpt=true", "rank=4",
                          "val_data=null", "betas=[0.9, 0.95]", "method_args={init_lora_weights: gaussian}"])
    assert cfg.lr == 3e-5 and isinstance(cfg.lr, float)  # YAML reads 1e-4 as a string: converted
    assert cfg.batch_size == 8 and cfg.max_steps == 10 and cfg.packing is False and cfg.grad_ckpt is True
    assert cfg.targets == ["q_proj", "k_proj"] and cfg.rank == 4 and cfg.betas == [0.9, 0.95]
    assert cfg.method_args == {"init_lora_weights": "gaussian"}
    assert load_config(p).lr == 1e-4


def test_unknown_key_suggests_closest(tmp_path):
    p = write(tmp_path, "data: a.jsonl\nlearning_rat: 1e-4\n")
    with pytest.raises(ConfigError, match=r"run.yaml: unknown key 'learning_rat'"):
        load_config(p)
    with pytest.raises(ConfigError, match=r"command line: unknown key 'bach_size'; did you mean 'batch_size'"):
        load_config(None, ["data=a.jsonl", "bach_size=2"])


def test_wrong_type_names_key_value_and_type(tmp_path):
    p = write(tmp_path, "data: a.jsonl\nbatch_size: four\n")
    with pytest.raises(ConfigError, match=r"run.yaml: batch_size='four' is not a int"):
        load_config(p)
    with pytest.raises(ConfigError, match=r"packing='maybe' is not a bool"):
        load_config(None, ["data=a.jsonl", "packing=maybe"])
    with pytest.raises(ConfigError, match=r"max_steps=2.5 is not a int \| None"):
        load_config(None, ["data=a.jsonl", "max_steps=2.5"])


def test_bad_values_refused(tmp_path):
    with pytest.raises(ConfigError, match="precision='bf17-mixed'"):
        load_config(None, ["data=a.jsonl", "precision=bf17-mixed"])
    with pytest.raises(ConfigError, match="no training data"):
        load_config(None, [])
    with pytest.raises(ConfigError, match="not key=value"):
        load_config(None, ["data"])
    with pytest.raises(ConfigError, match="does not apply to method=ia3"):
        method_config(load_config(None, ["data=a.jsonl", "method=ia3", "rank=4"]))


def test_cli_bad_config_exits_2_with_one_line(tmp_path, capsys):
    p = write(tmp_path, "data: a.jsonl\nlrr: 0.1\n")
    assert main(["finetune", str(p)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "run.yaml" in err and "'lrr'" in err and "did you mean 'lr'" in err
    assert main(["finetune", str(p).replace("run", "missing")]) == 2
    assert "config file not found" in capsys.readouterr().err


def test_cli_bad_type_subprocess(tmp_path):
    p = write(tmp_path, "data: a.jsonl\nepochs: [1, 2]\n")
    r = subprocess.run([sys.executable, "-m", "slimtune", "finetune", str(p)], capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and "epochs=[1, 2] is not a float" in r.stderr and "Traceback" not in r.stderr


def test_effective_config_round_trips(tmp_path):
    cfg = load_config(None, ["data=x.json", "lr=5e-4", "targets=[q_proj]", "max_steps=3"])
    save_config(cfg, tmp_path / "config.yaml")
    back = load_config(tmp_path / "config.yaml")
    assert back == cfg
    assert set(yaml.safe_load((tmp_path / "config.yaml").read_text())) == set(TrainConfig().to_dict())


@pytest.mark.parametrize("path", sorted(glob.glob(str(ROOT / "configs" / "*.yaml"))), ids=lambda p: Path(p).stem)
def test_example_configs_are_valid(path):
    cfg = load_config(path)
    assert Path(path).stem in (cfg.method, cfg.optimizer)  # configs/galore.yaml: method full, optimizer galore
    mcfg = method_config(cfg)
    assert (mcfg is None) == (cfg.method == "full")


@pytest.mark.parametrize("name, text, words", [
    ("notjson.jsonl", '{"instruction": "a", "output": "b"}\n{"instruction": "a", output: b}\n', ["line 2", "JSON"]),
    ("noout.jsonl", '{"instruction": "a", "output": "b"}\n{"instruction": "c"}\n', ["line 2", "output"]),
    ("empty.jsonl", "", ["empty"]),
    ("role.jsonl", '{"messages": [{"role": "user", "content": "hi"}, {"role": "robot", "content": "x"}]}\n',
     ["line 1", "robot"]),
])
def test_cli_bad_data_exits_2_with_one_line(tmp_path, capsys, name, text, words):
    """Malformed data stops `slimtune finetune` before training: exit 2, one line naming the file and the place."""
    data = tmp_path / name
    data.write_text(text)
    out = tmp_path / "out"
    assert main(["finetune", str(write(tmp_path, "max_steps: 2\n")), f"data={data}", f"out_dir={out}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and name in err[0], err
    for w in words:
        assert w in err[0], (w, err[0])
    assert not (out / "checkpoints").exists()
