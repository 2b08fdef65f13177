"""The pack's ComfyUI nodes: thin glue from sockets to trainer_core (see comfy_bridge.py)."""
from comfy_api.latest import ComfyExtension, io

from .dataset import LoadDataset, RegImages
from .embedding import EmbeddingTrain
from .hypernet import ApplyHypernetwork, HypernetTrain
from .lora import LoRATrain
from .merge import MergeLoRAToCkpt
from .preview import LossChart, StepComparisonGrid, TriggerComparison
from .templates import register_thumbnail_route

NODES = [LoadDataset, RegImages, LoRATrain, HypernetTrain, ApplyHypernetwork, MergeLoRAToCkpt, LossChart,
         TriggerComparison, StepComparisonGrid, EmbeddingTrain]


class TrainerExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        # Called once while ComfyUI loads the pack, before its server adds its routes.
        register_thumbnail_route()
        return list(NODES)
