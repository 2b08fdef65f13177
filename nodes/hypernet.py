"""HypernetTrain and ApplyHypernetwork: A1111 hypernetworks trained and applied in the graph."""
from __future__ import annotations

import copy
import dataclasses
import logging

from comfy_api.latest import io, ui

from ..trainer_core.adapters.hypernetwork import ACTIVATIONS, WEIGHT_INITIALIZATIONS, HypernetworkConfig
from ..trainer_core.config import LATENT_SAMPLING, OPTIMIZERS
from ..trainer_core.errors import TrainerInputError
from ..trainer_core.prompt_templates import available_templates
from .merge import file_fingerprint
from .training_inputs import (batch_inputs, gradient_checkpointing_valid, memory_inputs, model_and_data_inputs,
                              replace_inputs, seed_and_save_inputs)
from .training_run import image_tensor, run_training, saved_name
from .types import NONE, model_files, picked_path

log = logging.getLogger(__name__)

# The trained trainer_core Hypernetwork object (eval mode). No core node has this socket.
Hypernetwork = io.Custom("HYPERNETWORK")

CAPTIONS_ONLY = "none (captions)"
HYPERNETWORK_SUFFIX = ".pt"


def hypernetwork_folder() -> str:
    """Where hypernetworks are written: the first "hypernetworks" folder, the one core's
    HypernetworkLoader lists first."""
    import folder_paths
    return folder_paths.get_folder_paths("hypernetworks")[0]


def with_template(dataset, template: str):
    """The dataset captioned through an A1111 prompt template for this run.

    A copy: ComfyUI keeps the LoadDataset output cached and may hand the same object to other
    nodes, so the incoming dataset is never changed.
    """
    if template == CAPTIONS_ONLY:
        return dataset
    from ..trainer_core.prompt_templates import read_template
    templated = copy.copy(dataset)
    templated.config = dataclasses.replace(dataset.config, template_lines=read_template(template))
    return templated


class HypernetTrain(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="HypernetTrain",
            display_name="Train Hypernetwork (SD1.x)",
            category="training",
            description=(
                "Trains an A1111-style hypernetwork on your pictures from LoadDataset: small networks "
                "that nudge every attention layer of the model, good for a style or a look. It is "
                "saved in models/hypernetworks (.pt) and loads in ComfyUI's Load Hypernetwork node "
                "and in A1111. Outputs the model with the hypernetwork applied, so a KSampler after "
                "it shows the result at once. Hypernetworks need a small learning rate (1e-5). "
                "Queueing it again with the same settings and pictures loads the saved file instead "
                "of training again."),
            inputs=[
                *model_and_data_inputs(),
                io.String.Input(
                    "output_name", default="skkmtn_hypernet",
                    tooltip="File name of the hypernetwork in models/hypernetworks (.pt is added). "
                            "Intermediate saves are named <output_name>_<step>."),
                io.Int.Input(
                    "steps", default=2000, min=1, max=1000000,
                    tooltip="How many training steps. Hypernetworks learn slowly: a few thousand steps "
                            "at 1e-5 is usual. Use save_every_steps and sample_every_steps to watch "
                            "the result and pick the best save."),
                io.Float.Input(
                    "learning_rate", default=1e-5, min=1e-8, max=1.0, step=1e-7,
                    tooltip="How big each learning step is. 1e-5 is the guides' (and A1111's) value; "
                            "5e-6 to 5e-5 is usual. LoRA values like 1e-3 turn a hypernetwork to noise "
                            "(a warning is logged above 1e-4)."),
                io.String.Input(
                    "layer_structure", default="1,2,2,1",
                    tooltip="Sizes of the hypernetwork's layers, as multiples of each attention layer's "
                            "width, starting and ending with 1. 1,2,1 is small; 1,2,2,1 (the guides' "
                            "choice) is larger; bigger learns more and overfits sooner."),
                io.Combo.Input(
                    "activation", options=list(ACTIVATIONS), default="mish",
                    tooltip="The function between layers. mish is the guides' choice; linear means none. "
                            "Only the ones ComfyUI's Load Hypernetwork can read are offered."),
                io.Boolean.Input(
                    "layer_norm", default=False,
                    tooltip="Normalise after each layer. Usually off. With an activation other than "
                            "linear it needs activate_output on, or ComfyUI would load it differently."),
                io.Boolean.Input(
                    "dropout", default=False,
                    tooltip="Randomly switch off 30% of the hidden units while training (A1111's "
                            "dropout), which can reduce overfitting. Never active when generating."),
                io.Boolean.Input(
                    "last_layer_dropout", default=False,
                    tooltip="With dropout on: also use dropout on the last hidden layer (A1111's option)."),
                io.Boolean.Input(
                    "activate_output", default=False,
                    tooltip="Apply the activation after the output layer too. Usually off."),
                io.Combo.Input(
                    "weight_initialization", options=list(WEIGHT_INITIALIZATIONS), default="Normal",
                    tooltip="How the new layers start out. Normal (small random values, A1111's "
                            "default) keeps the model unchanged at the start; leave it unless you know "
                            "you need another."),
                *batch_inputs(),
                io.Combo.Input(
                    "optimizer", options=list(OPTIMIZERS), default="AdamW",
                    tooltip="How weights are updated. AdamW: standard (A1111 uses it too). AdamW8bit: "
                            "less memory (needs bitsandbytes and a GPU). Prodigy: finds its own step "
                            "size (set learning_rate to 1.0)."),
                *memory_inputs(),
                io.Combo.Input(
                    "prompt_template", options=[CAPTIONS_ONLY] + available_templates(), default=CAPTIONS_ONLY,
                    tooltip="How each training prompt is made. none (captions): the caption files as "
                            "LoadDataset reads them. The others are A1111 prompt templates: each step "
                            "picks a line such as 'a painting of [name], [filewords]', with [name] the "
                            "instance token and [filewords] the caption. hypernetwork: the caption "
                            "alone (A1111's hypernetwork default); style/subject (_filewords): "
                            "A1111's style and subject lines; 'none' is A1111's none.txt, which "
                            "trains every picture with just the word 'picture'."),
                io.Combo.Input(
                    "latent_sampling", options=list(LATENT_SAMPLING), default="once",
                    tooltip="once: each picture is encoded one time to the VAE's most likely latent (as "
                            "VAE Encode does) and reused (fast). random: a fresh latent is drawn from "
                            "the VAE every time the picture is used (A1111's 'random' option; slower)."),
                *seed_and_save_inputs(),
                io.Combo.Input(
                    "resume_from", options=[NONE] + model_files("hypernetworks", HYPERNETWORK_SUFFIX), default=NONE,
                    tooltip="Continue training a hypernetwork from models/hypernetworks (one saved by "
                            "this node, or an A1111 one), up to 'steps' in total. none = start fresh."),
                *replace_inputs(),
                io.Boolean.Input(
                    "loss_csv", default=False,
                    tooltip="Also write the loss of every step to <output_name>_loss.csv next to the "
                            "file, for a spreadsheet."),
            ],
            outputs=[
                io.Model.Output(display_name="model",
                                tooltip="The model with the trained hypernetwork applied at strength 1."),
                Hypernetwork.Output(display_name="hypernetwork",
                                    tooltip="The trained hypernetwork, for Apply Hypernetwork (to use it at "
                                            "another strength or on another model)."),
                io.LossMap.Output(display_name="loss",
                                  tooltip="The loss of every step, for core's Plot Loss Graph node."),
                io.String.Output(display_name="hypernetwork_name",
                                 tooltip="The saved file's name inside models/hypernetworks, as Load "
                                         "Hypernetwork lists it."),
            ],
            hidden=[io.Hidden.unique_id, io.Hidden.prompt],
        )

    @classmethod
    def validate_inputs(cls, layer_structure=None, activation=None, layer_norm=None, activate_output=None,
                        weight_initialization=None, gradient_checkpointing=None):
        # Named here, ComfyUI leaves gradient_checkpointing's check to this method, so true/false pass.
        if gradient_checkpointing is not None and not gradient_checkpointing_valid(gradient_checkpointing):
            return f"gradient_checkpointing must be auto, on or off (got {gradient_checkpointing!r})"
        if None in (layer_structure, activation, layer_norm, activate_output, weight_initialization):
            return True
        try:
            HypernetworkConfig(layer_structure=layer_structure, activation=activation, layer_norm=layer_norm,
                               activate_output=activate_output,
                               weight_initialization=weight_initialization).validate()
        except TrainerInputError as problem:
            return str(problem)
        return True

    @classmethod
    def execute(cls, model, clip, vae, dataset, output_name, steps, learning_rate, layer_structure, activation,
                layer_norm, dropout, last_layer_dropout, activate_output, weight_initialization, batch_size,
                gradient_accumulation, optimizer, precision, gradient_checkpointing, prompt_template,
                latent_sampling, seed, save_every_steps,
                sample_every_steps, resume_from, overwrite, force_retrain, loss_csv,
                regularization=None) -> io.NodeOutput:
        from ..trainer_core.config import TrainConfig
        from ..trainer_core.plots import loss_chart
        from ..trainer_core.train import train_hypernetwork
        from . import comfy_bridge as bridge

        output_dir = hypernetwork_folder()
        hypernetwork_config = HypernetworkConfig(
            layer_structure=layer_structure, activation=activation, layer_norm=layer_norm, dropout=dropout,
            last_layer_dropout=last_layer_dropout, activate_output=activate_output,
            weight_initialization=weight_initialization)
        train_config = TrainConfig(
            output_dir=output_dir, output_name=output_name, steps=steps, batch_size=batch_size,
            gradient_accumulation=gradient_accumulation, seed=seed, learning_rate=learning_rate,
            optimizer=optimizer, precision=precision, gradient_checkpointing=gradient_checkpointing,
            latent_sampling=latent_sampling, save_every_steps=save_every_steps,
            sample_every_steps=sample_every_steps, resume_from=picked_path("hypernetworks", resume_from),
            overwrite=overwrite, force_retrain=force_retrain, loss_csv=loss_csv)
        run_dataset = with_template(dataset, prompt_template)
        result = run_training(
            model, clip, vae, steps, cls.hidden,
            lambda parts, callbacks: train_hypernetwork(parts, run_dataset, hypernetwork_config, train_config,
                                                        regularization, callbacks))

        hypernetwork = result.adapter.eval()
        chart = image_tensor(loss_chart(result.losses))
        return io.NodeOutput(bridge.apply_hypernetwork(model, hypernetwork, 1.0), hypernetwork,
                             bridge.to_loss_map(result.losses), saved_name(result.final_path, output_dir),
                             ui=ui.PreviewImage(chart, cls=cls))


class ApplyHypernetwork(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ApplyHypernetwork",
            display_name="Apply Hypernetwork",
            category="training",
            description=(
                "Applies a hypernetwork to a model: either one trained in this workflow (connect "
                "HypernetTrain's hypernetwork output) or a .pt file from models/hypernetworks. The "
                "result is the same as ComfyUI's Load Hypernetwork node gives for the saved file. "
                "The input model is left unchanged."),
            inputs=[
                io.Model.Input("model", tooltip="The SD1.x model to apply the hypernetwork to."),
                io.Combo.Input(
                    "hypernetwork_name", default=NONE,
                    options=[NONE] + model_files("hypernetworks", HYPERNETWORK_SUFFIX),
                    tooltip="A hypernetwork file from models/hypernetworks. Leave at none when a "
                            "hypernetwork is connected below."),
                io.Float.Input(
                    "strength", default=1.0, min=-10.0, max=10.0, step=0.01,
                    tooltip="How strongly the hypernetwork acts: 1 as trained, 0 not at all, values "
                            "between weaken it (0.5-1 is usual)."),
                Hypernetwork.Input(
                    "hypernetwork", optional=True,
                    tooltip="Optional: a hypernetwork trained in this workflow (HypernetTrain's "
                            "hypernetwork output), used instead of a file."),
            ],
            outputs=[io.Model.Output(display_name="model",
                                     tooltip="A copy of the model with the hypernetwork applied.")],
        )

    @classmethod
    def fingerprint_inputs(cls, hypernetwork_name=NONE, **_):
        # Reruns when the file behind an unchanged name is retrained.
        return NONE if hypernetwork_name == NONE else file_fingerprint("hypernetworks", hypernetwork_name)

    @classmethod
    def execute(cls, model, hypernetwork_name, strength, hypernetwork=None) -> io.NodeOutput:
        from . import comfy_bridge as bridge
        if hypernetwork is not None and hypernetwork_name != NONE:
            raise TrainerInputError(
                f"ApplyHypernetwork: a hypernetwork is connected and the file {hypernetwork_name!r} is "
                f"picked too. Set hypernetwork_name to none to use the connected one, or disconnect it "
                f"to use the file.")
        if hypernetwork is None:
            if hypernetwork_name == NONE:
                raise TrainerInputError(
                    "ApplyHypernetwork: no hypernetwork. Pick a file in hypernetwork_name, or connect "
                    "HypernetTrain's hypernetwork output.")
            from ..trainer_core.adapters.hypernetwork import load_hypernetwork
            hypernetwork, _ = load_hypernetwork(picked_path("hypernetworks", hypernetwork_name))
        return io.NodeOutput(bridge.apply_hypernetwork(model, hypernetwork, strength))
