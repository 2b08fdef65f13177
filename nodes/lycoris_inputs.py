"""LoRATrain's inputs for the LyCORIS network types (LoCon, LoHa, LoKr)."""
from comfy_api.latest import io

from ..trainer_core.adapters.lora import NETWORK_TYPES


def network_type_inputs() -> list:
    return [
        io.Combo.Input(
            "network_type", options=list(NETWORK_TYPES), default="lora", optional=True,
            tooltip="What kind of add-on to train. lora: the attention layers (the usual LoRA). locon: "
                    "also the ResNet convolutions, more detail and texture. loha / lokr (LyCORIS): more "
                    "capacity for the file size; keep loha's rank at 32 or less. All load with Load LoRA."),
        io.Int.Input(
            "conv_rank", default=4, min=0, max=256, optional=True,
            tooltip="locon/loha/lokr: the rank of the 3x3 ResNet and up/down-sampling convolutions "
                    "(1x1 ones use rank). 0 leaves the convolutions out. Ignored by lora."),
        io.Float.Input(
            "conv_alpha", default=4.0, min=0.01, max=1024.0, step=0.01, optional=True,
            tooltip="locon/loha/lokr: alpha of those convolutions; their effect is scaled by "
                    "conv_alpha / conv_rank. Ignored by lora."),
        io.Int.Input(
            "factor", default=-1, min=-1, max=1024, optional=True,
            tooltip="lokr only: the size of the small Kronecker factor. -1 chooses it per layer (the "
                    "LyCORIS default); 4 to 8 suits characters. Smaller = smaller file."),
    ]
