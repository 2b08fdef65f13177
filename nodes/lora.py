"""LoRATrain: trains a kohya-format LoRA on the MODEL/CLIP and hands back the patched pair."""
from __future__ import annotations

from comfy_api.latest import io, ui

from ..trainer_core.config import LR_SCHEDULERS, OPTIMIZERS
from .lycoris_inputs import network_type_inputs
from .training_inputs import (batch_inputs, gradient_checkpointing_valid, memory_inputs, model_and_data_inputs,
                              replace_inputs, seed_and_save_inputs)
from .training_run import image_tensor, run_training, saved_name
from .types import NONE, picked_path



def lora_folder() -> str:
    """Where LoRAs are written: the first "loras" folder, the one LoraLoader lists first."""
    import folder_paths
    return folder_paths.get_folder_paths("loras")[0]


def resumable_loras() -> list:
    import folder_paths
    return [name for name in folder_paths.get_filename_list("loras") if name.endswith(".safetensors")]


class LoRATrain(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="LoRATrain",
            display_name="Train LoRA (SD1.x)",
            category="training",
            description=(
                "Teaches an SD1.x model your subject from a LoadDataset, as a small add-on file (a "
                "LoRA) saved in models/loras. Outputs the model and CLIP with the LoRA applied, so "
                "a KSampler after it shows the result at once. Queueing it again with the same "
                "settings and pictures loads the saved file instead of training again."),
            inputs=[
                *model_and_data_inputs(),
                io.String.Input(
                    "output_name", default="skkmtn_lora",
                    tooltip="File name of the LoRA in models/loras (.safetensors is added). "
                            "Intermediate saves are named <output_name>_<step>."),
                io.Int.Input(
                    "steps", default=1400, min=1, max=100000,
                    tooltip="How many training steps. The guides use about 1400 for 10-30 pictures; "
                            "more steps learn more but can overdo it (pictures look burnt or stiff)."),
                io.Float.Input(
                    "learning_rate", default=1e-3, min=1e-7, max=1.0, step=1e-6,
                    tooltip="How big each learning step is for the image model (UNet). 1e-3 is the "
                            "guides' LoRA value; lower it if results break up, raise it if nothing changes."),
                io.Float.Input(
                    "text_encoder_learning_rate", default=5e-5, min=1e-7, max=1.0, step=1e-6,
                    tooltip="The step size for the text encoder, used only when train_text_encoder is on. "
                            "Keep it much smaller than learning_rate (5e-5 is usual)."),
                io.Boolean.Input(
                    "train_text_encoder", default=False,
                    tooltip="Also teach the text encoder (CLIP) the new word. Can learn the token "
                            "faster, but uses more memory and overfits more easily."),
                io.Int.Input(
                    "rank", default=4, min=1, max=256,
                    tooltip="How much the LoRA can hold (its size). 4-32 is usual; bigger files learn "
                            "more detail and overfit sooner."),
                io.Float.Input(
                    "alpha", default=4.0, min=0.01, max=1024.0, step=0.01,
                    tooltip="Scales the LoRA's effect by alpha / rank. alpha = rank gives scale 1; "
                            "alpha = 1 (kohya's default) needs a larger learning rate."),
                *batch_inputs(),
                io.Combo.Input(
                    "optimizer", options=list(OPTIMIZERS), default="AdamW",
                    tooltip="How weights are updated. AdamW: standard. AdamW8bit: less memory (needs "
                            "bitsandbytes and a GPU). Prodigy: finds its own step size (set learning "
                            "rates to 1.0)."),
                io.Combo.Input(
                    "lr_scheduler", options=list(LR_SCHEDULERS), default="constant",
                    tooltip="How the learning rate changes over the run: constant, or falling to zero "
                            "(cosine, linear)."),
                io.Int.Input(
                    "warmup_steps", default=0, min=0, max=100000,
                    tooltip="Steps at the start during which the learning rate rises from 0. 0 = none."),
                *memory_inputs(),
                *seed_and_save_inputs(),
                io.Combo.Input(
                    "resume_from", options=[NONE] + resumable_loras(), default=NONE,
                    tooltip="Continue training from a LoRA saved earlier by this node (e.g. an "
                            "intermediate save), up to 'steps' in total. none = start fresh."),
                *replace_inputs(),
                # Last and optional, so workflows and API prompts made before these inputs existed
                # keep their widget values and still run (as plain LoRAs).
                *network_type_inputs(),
            ],
            outputs=[
                io.Model.Output(display_name="model", tooltip="The model with the trained LoRA applied."),
                io.Clip.Output(display_name="clip", tooltip="The CLIP with the LoRA applied (changed only "
                                                            "when train_text_encoder is on)."),
                io.LoraModel.Output(display_name="lora",
                                    tooltip="The LoRA weights, for core's Load LoRA Model or Save LoRA Weights "
                                            "nodes (those apply the model part only)."),
                io.LossMap.Output(display_name="loss", tooltip="The loss of every step, for core's Plot "
                                                               "Loss Graph node."),
                io.String.Output(display_name="lora_name",
                                 tooltip="The saved file's name inside models/loras, as LoraLoader lists it."),
            ],
            hidden=[io.Hidden.unique_id, io.Hidden.prompt],
        )

    @classmethod
    def validate_inputs(cls, gradient_checkpointing=None):
        # Named here, ComfyUI leaves this input's check to this method, so true/false pass.
        if gradient_checkpointing is None or gradient_checkpointing_valid(gradient_checkpointing):
            return True
        return f"gradient_checkpointing must be auto, on or off (got {gradient_checkpointing!r})"

    @classmethod
    def execute(cls, model, clip, vae, dataset, output_name, steps, learning_rate, text_encoder_learning_rate,
                train_text_encoder, rank, alpha, batch_size, gradient_accumulation, optimizer, lr_scheduler,
                warmup_steps, precision, gradient_checkpointing, seed, save_every_steps, sample_every_steps,
                resume_from, overwrite, force_retrain, regularization=None, network_type="lora", conv_rank=4,
                conv_alpha=4.0, factor=-1) -> io.NodeOutput:
        from ..trainer_core.adapters.lora import LoRAConfig
        from ..trainer_core.config import TrainConfig
        from ..trainer_core.plots import loss_chart
        from ..trainer_core.train import train_lora
        from . import comfy_bridge as bridge

        output_dir = lora_folder()
        lora_config = LoRAConfig(rank=rank, alpha=alpha, train_text_encoder=train_text_encoder,
                                 network_type=network_type, conv_rank=conv_rank, conv_alpha=conv_alpha,
                                 factor=factor)
        train_config = TrainConfig(
            output_dir=output_dir, output_name=output_name, steps=steps, batch_size=batch_size,
            gradient_accumulation=gradient_accumulation, seed=seed, learning_rate=learning_rate,
            text_encoder_learning_rate=text_encoder_learning_rate, optimizer=optimizer,
            lr_scheduler=lr_scheduler, warmup_steps=warmup_steps, precision=precision,
            gradient_checkpointing=gradient_checkpointing, save_every_steps=save_every_steps,
            sample_every_steps=sample_every_steps, resume_from=picked_path("loras", resume_from),
            overwrite=overwrite, force_retrain=force_retrain)
        result = run_training(
            model, clip, vae, steps, cls.hidden,
            lambda parts, callbacks: train_lora(parts, dataset, lora_config, train_config, regularization,
                                                callbacks),
            train_text_encoder=train_text_encoder)

        state_dict = result.kohya_state_dict
        unmatched = bridge.unmatched_lora_keys(model, clip, state_dict)
        if unmatched:
            raise RuntimeError(
                f"ComfyUI's LoRA loader would ignore {len(unmatched)} key(s) of {result.final_path}, e.g. "
                f"{unmatched[:3]}. This is a bug in the trainer pack; please report it with this message.")
        lora_model, lora_clip = bridge.apply_lora(model, clip, state_dict)
        chart = image_tensor(loss_chart(result.losses))
        return io.NodeOutput(lora_model, lora_clip, bridge.to_lora_model(state_dict),
                             bridge.to_loss_map(result.losses), saved_name(result.final_path, output_dir),
                             ui=ui.PreviewImage(chart, cls=cls))
