"""EmbeddingTrain: textual inversion and DreamArtist embeddings trained in the graph."""
from __future__ import annotations

import logging

from comfy_api.latest import io, ui

from ..trainer_core.adapters.embedding import CFG_CURVES, FILE_FORMATS, MODES, check_embedding_name
from ..trainer_core.errors import TrainerInputError, names_as
from ..trainer_core.prompt_templates import available_templates
from .hypernet import CAPTIONS_ONLY
from .training_inputs import batch_inputs, gradient_checkpointing_valid, memory_inputs, replace_inputs
from .training_run import image_tensor, run_training, saved_name
from .types import MAX_SEED, NONE, RegularizationSet, TrainingDataset, model_files, picked_path

log = logging.getLogger(__name__)
EMBEDDING_SUFFIXES = (".safetensors", ".pt")


def embedding_folder() -> str:
    """Where embeddings are written: the first "embeddings" folder, where `embedding:<name>` looks."""
    import folder_paths
    return folder_paths.get_folder_paths("embeddings")[0]


def embedding_folders() -> list:
    import folder_paths
    return list(folder_paths.get_folder_paths("embeddings"))


class EmbeddingTrain(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="EmbeddingTrain",
            display_name="Train Embedding (Textual Inversion / DreamArtist)",
            category="training",
            description=(
                "Teaches the text encoder a new word for your subject or style from a LoadDataset: a few "
                "vectors (an embedding, a few KB) saved in models/embeddings. The model itself does not "
                "change. Use it as embedding:<name> in a prompt here, in A1111 or kohya. DreamArtist mode "
                "also trains <name>-neg for the negative prompt. Outputs the CLIP to encode prompts with "
                "and the prompt texts to use. Queueing it again with the same settings and pictures loads "
                "the saved file instead of training again."),
            inputs=[
                io.Model.Input("model", tooltip="The SD1.x model from a checkpoint loader. It is not trained; "
                                                "the embedding learns what makes it draw your pictures."),
                io.Clip.Input("clip", tooltip="The text encoder (CLIP) from the same checkpoint loader. Only "
                                              "the new word's vectors train; the CLIP itself is not changed."),
                io.Vae.Input("vae", tooltip="The VAE from the same checkpoint loader; it turns the training "
                                            "pictures into the model's latent space."),
                TrainingDataset.Input(
                    "dataset", tooltip="The pictures and captions from LoadDataset. Its instance token in the "
                                       "captions is read as the new embedding."),
                RegularizationSet.Input("regularization", optional=True, tooltip=(
                    "Optional: RegImages class pictures, accepted so a LoRA workflow's RegImages can stay "
                    "wired. An embedding learns only from prompts with its own word, and class captions never "
                    "hold it, so they would not change what it learns: they are not trained on (the run says "
                    "so in the console).")),
                io.String.Input(
                    "name", default="skkmtn_emb",
                    tooltip="The new word: the file name in models/embeddings and what you type as "
                            "embedding:<name>. Letters, digits, _ and -; not a word CLIP already knows (such "
                            "as 'cat'). Intermediate saves are named <name>-<step>."),
                io.Combo.Input(
                    "mode", options=list(MODES), default="textual_inversion",
                    tooltip="textual_inversion: one embedding for the positive prompt. dreamartist: also "
                            "<name>-neg for the negative prompt, trained together (each step learns from "
                            "the guided mix of both, as DreamArtist does)."),
                io.Int.Input(
                    "vectors", default=3, min=1, max=75,
                    tooltip="Vectors (tokens) of the embedding: more holds more detail but takes more of the "
                            "prompt's 75 tokens. 1-4 is usual for textual inversion, 3 for DreamArtist."),
                io.Int.Input(
                    "negative_vectors", default=6, min=1, max=75,
                    tooltip="DreamArtist only: vectors of <name>-neg (DreamArtist's default is 6)."),
                io.String.Input(
                    "init_text", default="*",
                    tooltip="The word(s) the vectors start from, e.g. a word close to your subject "
                            "('creature'). '*' is A1111's default; empty starts from zeros."),
                io.Int.Input(
                    "steps", default=2000, min=1, max=1000000,
                    tooltip="How many training steps. Embeddings learn slowly: 1500-3000 for textual "
                            "inversion; DreamArtist's guide uses several thousand. Use save_every_steps to "
                            "pick the best save."),
                io.Float.Input(
                    "learning_rate", default=0.0, min=0.0, max=1.0, step=1e-5,
                    tooltip="How big each learning step is. 0 = the mode's default: 5e-3 for textual "
                            "inversion (A1111), 3e-3 for DreamArtist."),
                io.Float.Input(
                    "cfg_scale", default=3.0, min=0.01, max=30.0, step=0.1,
                    tooltip="DreamArtist only: the guidance scale the positive/negative pair is trained at "
                            "(DreamArtist: 3). Generate with a cfg around this value or somewhat higher."),
                io.Float.Input(
                    "cfg_scale_high", default=0.0, min=0.0, max=30.0, step=0.1,
                    tooltip="DreamArtist only: above 0, the training scale rises from cfg_scale at the "
                            "least noisy steps to this value at the noisiest. 0 = cfg_scale throughout."),
                io.Combo.Input(
                    "cfg_curve", options=list(CFG_CURVES), default="linear",
                    tooltip="DreamArtist only, with cfg_scale_high: how the scale rises with the noise level "
                            "(DreamArtist's ln, cos and cos2 shapes; linear is its 'ln')."),
                io.Float.Input(
                    "negative_lr_weight", default=1.0, min=0.0001, max=100.0, step=0.1,
                    tooltip="DreamArtist only: the negative embedding learns at learning_rate times this."),
                io.Combo.Input(
                    "prompt_template", options=[CAPTIONS_ONLY] + available_templates(),
                    default="subject_filewords",
                    tooltip="How each training prompt is made. A1111 templates: each step picks a line such "
                            "as 'a photo of [name], [filewords]', [name] being embedding:<name> and "
                            "[filewords] the caption. subject: a thing or character; style: an art style "
                            "(_filewords adds the caption). none (captions): the captions as written, with "
                            "the instance token read as the embedding."),
                *batch_inputs(),
                *memory_inputs(),
                io.Int.Input(
                    "seed", default=0, min=0, max=MAX_SEED, control_after_generate=False,
                    tooltip="Makes training repeatable: the same seed, settings and pictures give the same "
                            "embedding (and let a re-queue reuse the saved file)."),
                io.Int.Input(
                    "save_every_steps", default=500, min=0, max=1000000,
                    tooltip="Also save every this many steps as <name>-<step> (and <name>-<step>-neg), to "
                            "try earlier ones or resume later. 0 = only the final file."),
                io.Combo.Input(
                    "file_format", options=list(FILE_FORMATS), default="safetensors",
                    tooltip="safetensors: one tensor 'emb_params' (kohya's layout; loads in ComfyUI, A1111 "
                            "and kohya). a1111_pt: A1111's own .pt embedding file."),
                io.Combo.Input(
                    "resume_from", options=[NONE] + model_files("embeddings", EMBEDDING_SUFFIXES), default=NONE,
                    tooltip="Continue training from an embedding saved earlier by this node (e.g. an "
                            "intermediate save; in DreamArtist mode its -neg file is read too), up to "
                            "'steps' in total. none = start fresh."),
                *replace_inputs(),
            ],
            outputs=[
                io.Clip.Output(display_name="clip",
                               tooltip="The CLIP to encode prompts with: embedding:<name> in a prompt calls the "
                                       "trained embedding (read from the saved file, exactly as any CLIP does)."),
                io.String.Output(display_name="positive",
                                 tooltip="The text to put in the positive prompt: embedding:<name>."),
                io.String.Output(display_name="negative",
                                 tooltip="DreamArtist: the text for the negative prompt, embedding:<name>-neg. "
                                         "Empty in textual_inversion mode."),
                io.LossMap.Output(display_name="loss",
                                  tooltip="The loss of every step, for Loss Chart or core's Plot Loss Graph."),
                io.String.Output(display_name="embedding_files",
                                 tooltip="The saved final file(s) inside models/embeddings, comma-separated."),
            ],
            hidden=[io.Hidden.unique_id, io.Hidden.prompt],
        )

    @classmethod
    def validate_inputs(cls, name=None, gradient_checkpointing=None):
        # Named here, ComfyUI leaves gradient_checkpointing's check to this method, so true/false pass.
        if gradient_checkpointing is not None and not gradient_checkpointing_valid(gradient_checkpointing):
            return f"gradient_checkpointing must be auto, on or off (got {gradient_checkpointing!r})"
        if name is None:
            return True
        try:
            check_embedding_name(name)
        except TrainerInputError as problem:
            return str(problem)
        return True

    @classmethod
    def execute(cls, model, clip, vae, dataset, name, mode, vectors, negative_vectors, init_text, steps,
                learning_rate, cfg_scale, cfg_scale_high, cfg_curve, negative_lr_weight, prompt_template,
                batch_size, gradient_accumulation, precision, gradient_checkpointing, seed, save_every_steps,
                file_format, resume_from, overwrite, force_retrain, regularization=None) -> io.NodeOutput:
        from ..trainer_core.adapters.embedding import (EmbeddingConfig, default_learning_rate, embedding_dataset,
                                                       negative_name, placeholder, written_paths)
        from ..trainer_core.config import TrainConfig
        from ..trainer_core.plots import loss_chart
        from ..trainer_core.prompt_templates import read_template
        from ..trainer_core.train import train_embedding
        from . import comfy_bridge as bridge

        name = check_embedding_name(name)
        if regularization is not None:
            log.warning("EmbeddingTrain: the regularization pictures are not trained on: their captions never "
                        "hold the embedding's word, so they cannot change what it learns.")
        folder = embedding_folder()
        embedding_config = EmbeddingConfig(
            mode=mode, vectors=vectors, negative_vectors=negative_vectors, init_text=init_text,
            cfg_scale=cfg_scale, cfg_scale_high=cfg_scale_high, cfg_curve=cfg_curve,
            negative_lr_weight=negative_lr_weight, file_format=file_format)
        train_config = TrainConfig(
            output_dir=folder, output_name=name, steps=steps, batch_size=batch_size,
            gradient_accumulation=gradient_accumulation, seed=seed,
            learning_rate=learning_rate or default_learning_rate(mode), precision=precision,
            gradient_checkpointing=gradient_checkpointing, save_every_steps=save_every_steps,
            resume_from=picked_path("embeddings", resume_from), overwrite=overwrite, force_retrain=force_retrain)
        template = None if prompt_template == CAPTIONS_ONLY else read_template(prompt_template)
        run_dataset = embedding_dataset(dataset, name, template)

        def train(parts, callbacks):
            bridge.add_embedding_support(parts, clip)
            return train_embedding(parts, run_dataset, embedding_config, train_config, callbacks=callbacks,
                                   embedding_folders=embedding_folders())

        # The text encoder is in the gradient's path (into the vectors), so it is made trainable-through.
        with names_as({"output_name": "name"}):
            result = run_training(model, clip, vae, steps, cls.hidden, train, train_text_encoder=True)
        dreamartist = mode == "dreamartist"
        files = [saved_name(path, folder) for path in written_paths(result.final_path, dreamartist)]
        chart = image_tensor(loss_chart(result.losses))
        return io.NodeOutput(bridge.clip_finding_embeddings_in(clip, folder), placeholder(name),
                             placeholder(negative_name(name)) if dreamartist else "",
                             bridge.to_loss_map(result.losses), ", ".join(files),
                             ui=ui.PreviewImage(chart, cls=cls))
