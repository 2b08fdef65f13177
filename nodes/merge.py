"""MergeLoRAToCkpt: bake a LoRA into the model's weights and save a single-file SD1.x checkpoint."""
from __future__ import annotations

import os

from comfy_api.latest import io

from ..trainer_core.errors import TrainerInputError
from ..trainer_core.merge import SAVE_PRECISIONS
from .training_run import saved_name
from .types import NONE, model_files, picked_path


CHECKPOINT_SUFFIX = ".safetensors"
FROM_WORKFLOW = "LORA_MODEL from the workflow"


def checkpoint_folder() -> str:
    """Where checkpoints are written: the first "checkpoints" folder, the one Load Checkpoint lists first."""
    import folder_paths
    return folder_paths.get_folder_paths("checkpoints")[0]


def file_fingerprint(kind: str, name: str) -> str:
    """Changes when the file behind a name in a models folder is replaced (e.g. retrained)."""
    import folder_paths
    path = folder_paths.get_full_path(kind, name)
    if path is None or not os.path.exists(path):
        return name  # the node's execute reports the missing file
    stat = os.stat(path)
    return f"{path} {stat.st_size} {stat.st_mtime_ns}"


class MergeLoRAToCkpt(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="MergeLoRAToCkpt",
            display_name="Merge LoRA into Checkpoint",
            category="training",
            description=(
                "Bakes a LoRA permanently into the model's weights and saves the result as an "
                "ordinary SD1.x checkpoint in models/checkpoints, which Load Checkpoint, A1111 and "
                "other tools open without the LoRA file. Also outputs the merged model and CLIP, "
                "which generate like the base with the LoRA at these strengths and can be trained "
                "on again."),
            inputs=[
                io.Model.Input("model", tooltip="The SD1.x base model to merge into, from a checkpoint loader."),
                io.Clip.Input("clip", tooltip="The text encoder (CLIP) from the same checkpoint loader."),
                io.Vae.Input("vae", tooltip="The VAE from the same checkpoint loader; it is saved into the "
                                            "checkpoint unchanged."),
                io.LoraModel.Input(
                    "lora", optional=True,
                    tooltip="Optional: a LoRA made in this workflow (LoRATrain's lora output). Used "
                            "instead of a file; leave lora_name at none."),
                io.Combo.Input(
                    "lora_name", options=[NONE] + model_files("loras", ".safetensors"), default=NONE,
                    tooltip="A LoRA file from models/loras to merge. Leave at none when a LoRA is "
                            "connected above."),
                io.Float.Input(
                    "strength_model", default=1.0, min=-10.0, max=10.0, step=0.01,
                    tooltip="How strongly the LoRA changes the image model (UNet): 1 as trained, 0 not "
                            "at all. The same as LoraLoader's strength_model."),
                io.Float.Input(
                    "strength_clip", default=1.0, min=-10.0, max=10.0, step=0.01,
                    tooltip="How strongly the LoRA changes the text encoder, if it trained one: 1 as "
                            "trained, 0 not at all. The same as LoraLoader's strength_clip."),
                io.String.Input(
                    "output_name", default="merged_model",
                    tooltip="File name of the checkpoint in models/checkpoints (.safetensors is added)."),
                io.Combo.Input(
                    "save_precision", options=list(SAVE_PRECISIONS), default="fp16",
                    tooltip="Number format of the saved file. fp16: the usual 2 GB SD1.x file, "
                            "generates the same for all practical purposes. fp32: twice the size, "
                            "exact."),
                io.Boolean.Input(
                    "save_file", default=True,
                    tooltip="Write the checkpoint file. Off: only merge inside this workflow (the "
                            "outputs still work; nothing is written)."),
                io.Boolean.Input(
                    "overwrite", default=False,
                    tooltip="Allow replacing an existing checkpoint of the same name. Off: a clash "
                            "stops with a message instead."),
            ],
            outputs=[
                io.Model.Output(display_name="model",
                                tooltip="A new model whose weights contain the LoRA (the input model is "
                                        "unchanged). Use it to generate or to train again."),
                io.Clip.Output(display_name="clip", tooltip="A new CLIP whose weights contain the LoRA's "
                                                            "text-encoder part, if any."),
                io.String.Output(display_name="ckpt_name",
                                 tooltip="The saved checkpoint's name inside models/checkpoints, as Load "
                                         "Checkpoint lists it; empty when save_file is off."),
            ],
            hidden=[io.Hidden.unique_id, io.Hidden.prompt],
        )

    @classmethod
    def fingerprint_inputs(cls, lora_name=NONE, **_):
        # Reruns when the LoRA file behind an unchanged name is retrained.
        return NONE if lora_name == NONE else file_fingerprint("loras", lora_name)

    @classmethod
    def execute(cls, model, clip, vae, lora_name, strength_model, strength_clip, output_name, save_precision,
                save_file, overwrite, lora=None) -> io.NodeOutput:
        from ..trainer_core.formats import safe_output_path
        from ..trainer_core.merge import lora_hash, merge_into_checkpoint, merge_metadata
        from . import comfy_bridge as bridge

        bridge.check_sd1(model)
        folder = checkpoint_folder()
        path = safe_output_path(folder, output_name, CHECKPOINT_SUFFIX, overwrite=True) if save_file else ""
        lora_state_dict, lora_label = cls._lora(lora, lora_name)

        state_dict = bridge.checkpoint_state_dict(model, clip, vae)
        metadata = None
        if save_file:
            metadata = merge_metadata(
                os.path.splitext(os.path.basename(path))[0],
                bridge.checkpoint_name(cls.hidden.prompt, cls.hidden.unique_id),
                # Hashed now, while the live weights hold what was just copied (patches included).
                bridge.base_model_hash(model, clip, vae),
                lora_label, lora_hash(lora_state_dict), strength_model, strength_clip, save_precision)
        merged = merge_into_checkpoint(state_dict, lora_state_dict, bridge.checkpoint_lora_keys(model, clip),
                                       strength_model, strength_clip, save_precision, path, metadata, overwrite)
        # The caller's full CPU copy of the base weights goes before the new models are built: at
        # SD1.5 size this node's peak RSS fell from 14.6 to 10.9 GB (test_full_size_sd15.py's merge).
        del state_dict
        ckpt_name = saved_name(path, folder) if save_file else ""
        merged_model, merged_clip = bridge.models_from_checkpoint_state_dict(merged)
        return io.NodeOutput(merged_model, merged_clip, ckpt_name)

    @classmethod
    def _lora(cls, lora, lora_name):
        """(kohya state dict, a label for the metadata) from the socket or the file."""
        if lora is not None and lora_name != NONE:
            raise TrainerInputError(
                f"MergeLoRAToCkpt: a LoRA is connected and the file {lora_name!r} is picked too. Set "
                f"lora_name to none to merge the connected one, or disconnect it to merge the file.")
        if lora is not None:
            return lora, FROM_WORKFLOW
        if lora_name == NONE:
            raise TrainerInputError(
                "MergeLoRAToCkpt: no LoRA. Pick a file in lora_name, or connect LoRATrain's lora output.")
        from ..trainer_core.formats import load_lora
        state_dict, _ = load_lora(picked_path("loras", lora_name))
        return state_dict, lora_name
