"""Several processes (as under `accelerate launch`): each trains on its own batches, gradients are averaged."""
import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

SAMPLES = os.path.join(os.path.dirname(os.path.dirname(__file__)), "sample_dataset")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, out):
    from trainer_core.adapters.lora import LoRAConfig
    from trainer_core.backends.diffusers import tiny_parts
    from trainer_core.config import TrainConfig
    from trainer_core.dataset import DatasetConfig, ImageDataset
    from trainer_core.train import train_lora
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        dataset = ImageDataset.from_folder(DatasetConfig(folder=SAMPLES, instance_token="skkmtn", resolution=64))
        config = TrainConfig(output_dir=out, output_name="ddp", steps=3, seed=1)
        result = train_lora(tiny_parts(), dataset, LoRAConfig(), config)
        weights = {k: v.detach().cpu() for k, v in result.adapter.state_dict().items()}
        torch.save({"weights": weights, "losses": result.losses}, os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_processes_stay_in_sync_and_write_one_file(tmp_path):
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    for key, tensor in ranks[0]["weights"].items():
        assert torch.equal(tensor, ranks[1]["weights"][key]), key
    assert ranks[0]["losses"] == ranks[1]["losses"], "the logged loss is the average over processes"
    assert sorted(p.name for p in tmp_path.glob("*.safetensors")) == ["ddp.safetensors"]
    ups = [t for k, t in ranks[0]["weights"].items() if "lora_up" in k]
    assert any(t.abs().max() > 0 for t in ups)
