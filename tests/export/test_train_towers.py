"""benchmarks/train_towers.py on a tiny tower: it learns, caches, and its checkpoint goes the user's way in."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clipfuse.core.errors import ClipfuseError
from clipfuse.export.graph import backbones as bb

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "train_towers.py"
TOWER = "clipfuse-test-rn"


def load_script():
    spec = importlib.util.spec_from_file_location("train_towers", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def easy_folder(root: Path, classes=("dark", "light"), per_class=24) -> Path:
    """Two trivially different classes: dark and light noisy squares."""
    rng = np.random.default_rng(0)
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            level = 50 + 150 * c
            img = np.clip(level + rng.normal(0, 20, (48, 48, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(img).save(root / name / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("towers")
    mod = load_script()
    data = easy_folder(tmp / "data")
    rc = mod.main(["--tower", f"{TOWER}:1:0.003", "--steps", "20", "--batch", "8", "--data", str(data),
                   "--cache", str(tmp / "cache"), "--print"])
    assert rc == 0
    (ckpt,) = (tmp / "cache").glob("*.safetensors")
    return mod, tmp, data, ckpt


def test_the_loss_falls_and_the_checkpoint_loads_as_a_user_checkpoint_with_its_hash(trained, capsys):
    mod, tmp, data, ckpt = trained
    record = json.loads(ckpt.with_suffix(".json").read_text())
    assert record["steps"] == 20 and len(record["losses"]) == 20
    assert record["loss_last_tenth"] < 0.5 * record["loss_first_tenth"], record["losses"]
    built = bb.load_backbone(f"{TOWER}:{ckpt}")
    assert built.weights_sha256 == record["visual_sha256"]
    assert built.weights_sha256 != bb.load_backbone(f"{TOWER}:random:1").weights_sha256     # it did train
    # the manifest of an engine built on it records that hash
    from clipfuse.export.graph.engine import export_engine

    out = export_engine([f"{TOWER}:{ckpt}"], ["dark", "light"], tmp / "engine").folder
    manifest = json.loads((Path(out) / "manifest.json").read_text())
    assert manifest["backbones"][0]["weights_sha256"] == record["visual_sha256"]


def test_a_second_run_is_free(trained, capsys):
    mod, tmp, data, ckpt = trained
    before = ckpt.stat().st_mtime_ns
    paths = mod.train_tower(TOWER, 1, 0.003, steps=20, batch=8, data=str(data), root=tmp / "cache", log=print)
    assert paths == ckpt and ckpt.stat().st_mtime_ns == before
    assert "cached" in capsys.readouterr().out
    assert sorted(p.name for p in (tmp / "cache").iterdir() if p.name.startswith(".")) == []   # no temporaries


def test_a_checkpoint_of_another_architecture_is_one_line(trained):
    ckpt = trained[3]
    with pytest.raises(ClipfuseError, match=r"is not a clipfuse-test-vit checkpoint.*Name the architecture") as e:
        bb.load_backbone(f"clipfuse-test-vit:{ckpt}")
    assert "\n" not in str(e.value)


def test_a_truncated_checkpoint_is_one_line(trained, tmp_path):
    ckpt = trained[3]
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])
    with pytest.raises(ClipfuseError, match=str(cut).replace(".", r"\.")) as e:
        bb.load_backbone(f"{TOWER}:{cut}")
    assert "\n" not in str(e.value)


def test_a_training_set_with_one_class_is_one_line(tmp_path, capsys):
    mod = load_script()
    data = easy_folder(tmp_path / "data", classes=("dark",))
    rc = mod.main(["--tower", f"{TOWER}:1:0.003", "--steps", "2", "--data", str(data), "--cache", str(tmp_path / "c")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "at least two classes" in err[0] and str(data) in err[0]
    assert not (tmp_path / "c").exists() or not list((tmp_path / "c").iterdir())


def test_bad_options_are_one_line(tmp_path, capsys):
    mod = load_script()
    with pytest.raises(SystemExit):
        mod.main(["--tower", "RN50:zero", "--cache", str(tmp_path)])
    assert "ARCH:SEED:LR" in capsys.readouterr().err
    assert mod.main(["--tower", f"{TOWER}:1:0.003", "--steps", "0", "--cache", str(tmp_path)]) == 2
    assert "--steps" in capsys.readouterr().err
    assert mod.main(["--tower", "NoSuchNet:1:0.003", "--steps", "1", "--cache", str(tmp_path)]) == 2
    assert "NoSuchNet" in capsys.readouterr().err


def test_the_generated_images_are_seeded_and_their_splits_never_share_a_source_digit():
    sys.path.insert(0, str(SCRIPT.parent))
    import tower_digits as cd

    a, la = cd.render("figures", 3)
    b, lb = cd.render("figures", 3)
    assert a.shape == (224, 224, 3) and a.dtype == np.uint8 and np.array_equal(a, b) and la == lb
    assert not np.array_equal(a, cd.render("figures", 4)[0])
    pre, fig = cd.sources("pretrain")[0], cd.sources("figures")[0]
    assert len(pre) + len(fig) == 1797
    flat = {p.tobytes() for p in pre}
    assert sum(f.tobytes() in flat for f in fig) <= 5        # sklearn's digits hold a few exact repeats
    assert sorted(set(cd.render_many("pretrain", 60)[1].tolist())) == list(range(10))
