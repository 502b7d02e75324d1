import torch

from fl.config import load_config
from fl.simulation import backend_config


def test_client_resources_come_from_the_config():
    cfg = load_config(None, ["federation.client_cpus=0.5", "federation.client_gpus=0.0"])
    b = backend_config(cfg)
    assert b["client_resources"] == {"num_cpus": 0.5, "num_gpus": 0.0}
    assert b["init_args"]["address"] == "local" and b["init_args"]["num_cpus"] >= 1  # private, never a foreign cluster


def test_gpu_share_for_the_attack_is_withheld_from_ray(monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    cfg = load_config(None, ["federation.client_gpus=0.25", "attack.gpu_share=0.5"])
    b = backend_config(cfg)
    assert b["client_resources"]["num_gpus"] == 0.25
    assert b["init_args"]["num_gpus"] == 1.5


def test_existing_cluster_address_replaces_local_resources():
    cfg = load_config(None, ["federation.ray_address='127.0.0.1:6379'"])
    init = backend_config(cfg)["init_args"]
    assert init["address"] == "127.0.0.1:6379" and "num_cpus" not in init
