import pytest

from common.config import ConfigError, load_config
from tests.conftest import REPO


def test_presets_load():
    dbg = load_config(REPO / "configs/debug.yaml")
    t3d = load_config(REPO / "configs/t3d.yaml")
    assert dbg.model.flavour == "debug" and t3d.model.flavour == "t3d"
    assert t3d.data.spacing == [1.0, 1.0, 4.0] and t3d.data.size == [256, 256, 128]
    assert t3d.model.image_layers == [3, 4, 6, 3]  # ResNet-50
    sci = load_config(REPO / "configs/phantom.yaml")  # the science preset's measured schedule and TMA weights (docs/design.md)
    assert (sci.train.schedule, sci.train.decay_fraction, sci.train.steps) == ("wsd", 0.2, 1500)
    assert (sci.tma.w_local, sci.tma.w_consistency, sci.tma.w_sentence) == (0.25, 0.125, 1.0)


@pytest.mark.parametrize("name", sorted(p.name for p in (REPO / "configs").glob("*.yaml")))
def test_every_shipped_config_validates(name):
    assert load_config(REPO / "configs" / name).train.steps > 0


def test_flavour_picks_the_sizes_and_explicit_keys_win():
    from trainer.config import FLAVOURS

    dbg = load_config(REPO / "configs/debug.yaml")
    assert {k: getattr(dbg.model, k) for k in FLAVOURS["debug"]} == FLAVOURS["debug"]
    big = load_config(REPO / "configs/debug.yaml", ["model.flavour=t3d"])
    assert big.model.image_layers == [3, 4, 6, 3] and big.model.text_hidden == 768
    mixed = load_config(REPO / "configs/debug.yaml", ["model.embed_dim=32"])
    assert mixed.model.embed_dim == 32 and mixed.model.text_hidden == 64
    # a saved (resolved) config reloads to the same model sizes
    from common.config import config_from_dict

    assert config_from_dict(mixed.to_dict()).model == mixed.model
    with pytest.raises(ConfigError, match="model.flavour: 'tiny' is not one of"):
        load_config(None, ["model.flavour=tiny"])
    with pytest.raises(ConfigError, match="model.image_norm=group needs"):
        load_config(REPO / "configs/debug.yaml", ["model.image_widths=[12,32,64,128]", "model.image_norm=group"])


def test_override_and_types():
    cfg = load_config(REPO / "configs/debug.yaml", ["train.steps=7", "tma.enabled=false",
                                                    "data.spacing=[2, 2, 4]", "model.text_encoder=/x"])
    assert cfg.train.steps == 7 and cfg.tma.enabled is False
    assert cfg.data.spacing == [2.0, 2.0, 4.0] and isinstance(cfg.data.spacing[0], float)
    assert cfg.model.text_encoder == "/x"


def test_unknown_key_names_closest():
    with pytest.raises(ConfigError, match=r"unknown config key 'train.stepz'.*did you mean 'train.steps'"):
        load_config(None, ["train.stepz=3"])
    with pytest.raises(ConfigError, match=r"unknown config key 'dat'.*'data'"):
        load_config(None, ["dat.spacing=[1,1,1]"])


def test_wrong_type_and_value_rejected():
    with pytest.raises(ConfigError, match=r"'train.steps': expected int, got 'many'"):
        load_config(None, ["train.steps=many"])
    with pytest.raises(ConfigError, match="deepspeed.zero_stage"):
        load_config(None, ["deepspeed.zero_stage=4"])
    with pytest.raises(ConfigError, match="data.spacing"):
        load_config(None, ["data.spacing=[1, 1]"])
    with pytest.raises(ConfigError, match="expected key=value"):
        load_config(None, ["train.steps"])


def test_eval_section_is_checked():
    cfg = load_config(None, ["eval.tasks=[zeroshot,segmentation]", "eval.seg_roi=[64,64,32]"])
    assert cfg.eval.tasks == ["zeroshot", "segmentation"] and cfg.eval.seg_roi == [64, 64, 32]
    with pytest.raises(ConfigError, match="eval.tasks: 'segmentaton' is not one of"):
        load_config(None, ["eval.tasks=[segmentaton]"])
    with pytest.raises(ConfigError, match="eval.seg_roi"):
        load_config(None, ["eval.seg_roi=[64,64]"])
    with pytest.raises(ConfigError, match="eval.every_n_checkpoints"):
        load_config(None, ["eval.every_n_checkpoints=0"])


def test_elastic_settings_are_checked():
    cfg = load_config("configs/debug.yaml", ["ray.min_workers=1", "ray.worker_resources={train_slot: 1}"])
    assert (cfg.ray.min_workers, cfg.ray.num_workers, cfg.ray.worker_resources) == (1, 2, {"train_slot": 1.0})
    with pytest.raises(ConfigError, match="ray.min_workers"):
        load_config("configs/debug.yaml", ["ray.min_workers=3"])              # more than num_workers
    with pytest.raises(ConfigError, match="ray.placement_strategy"):
        load_config("configs/debug.yaml", ["ray.placement_strategy=EVERYWHERE"])
    with pytest.raises(ConfigError, match="ray.worker_resources"):
        load_config("configs/debug.yaml", ["ray.worker_resources=[1, 2]"])


def test_unreachable_mlflow_trains_untracked(tmp_path, monkeypatch, capsys):
    import socket

    from trainer.pretrain import mlflow_run

    with socket.socket() as s:                       # a loopback port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    cfg = load_config("configs/debug.yaml", [f"tracking.mlflow_uri=http://127.0.0.1:{port}"])
    assert mlflow_run(cfg, tmp_path, retries=0) == (None, None)
    out = capsys.readouterr().out
    assert f"MLflow at http://127.0.0.1:{port} did not answer" in out
    assert "WITHOUT tracking" in out and not (tmp_path / "mlflow_run_id").exists()
