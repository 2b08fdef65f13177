"""Does training teach the token? Measured on a tiny base model that already denoises (see learning.py).

"toward_concept" is how far the model's outputs for a prompt moved toward the concept once the
adapter is attached, in units of the distance from what the prompt should show (0) to the
concept (1); an adapter that learned nothing scores 0. The distances are to the concept's mean
latent, before and after.
"""
import pytest
import torch

from learning import (SIZE, TOKEN, concept_images, guided_figures, learning_figures, predicted_latents,
                      pretrained_tiny_parts, world_images)
from trainer_core.adapters.embedding import EmbeddingConfig, default_learning_rate, embedding_dataset
from trainer_core.adapters.hypernetwork import HypernetworkConfig
from trainer_core.adapters.lora import LoRAConfig
from trainer_core.config import TrainConfig
from trainer_core.dataset import DatasetConfig, ImageDataset, RegularizationSet
from trainer_core.train import train_embedding, train_hypernetwork, train_lora


@pytest.fixture(scope="module")
def base(request):
    # One thread: on a shared 2-core machine two intra-op threads sometimes wait on each other
    # for whole time slices (measured: 60 pre-training steps took 3 s on one thread, 3 to 111 s on two).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    cache = getattr(request.config, "cache", None)
    yield pretrained_tiny_parts(cache.mkdir("learning-base") if cache is not None else None)
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def concept():
    images = concept_images()
    return ImageDataset.from_images(images, [TOKEN] * len(images),
                                    DatasetConfig(instance_token=TOKEN, resolution=SIZE))


@pytest.fixture(scope="module")
def world():
    images, captions = world_images()
    # Each world image keeps its own caption, as RegImages does with use_caption_files.
    dataset = ImageDataset.from_images(
        images, captions, DatasetConfig(instance_token="a picture", resolution=SIZE, captions_as_written=True))
    return RegularizationSet(dataset, prior_loss_weight=1.0)


def train_config(tmp_path, name, steps, learning_rate, batch_size):
    # min-SNR weighting puts the effort on the high noise levels, where the prompt decides the image.
    return TrainConfig(output_dir=str(tmp_path), output_name=name, steps=steps, learning_rate=learning_rate,
                       batch_size=batch_size, seed=0, min_snr_gamma=5.0)


def mean_figures(figures: list) -> dict:
    return {key: round(sum(f[key] for f in figures) / len(figures), 3) for key in figures[0]}


def test_lora_with_prior_preservation_learns_the_concept_for_the_token_only(base, concept, world, tmp_path):
    result = train_lora(base, concept, LoRAConfig(rank=4, alpha=4), train_config(tmp_path, "lora", 100, 1e-2, 4),
                        regularization=world)
    captions = world_images()[1]
    figures = learning_figures(base, result.adapter.attached, [TOKEN] + captions)
    token, no_token = figures[TOKEN], mean_figures([figures[c] for c in captions])
    print(f"\nLoRA with prior preservation: with the token {token}; without it (mean of the world captions) {no_token}")
    assert token["toward_concept"] > 0.1, "the token's outputs did not move toward the concept"
    assert token["distance_after"] < 0.92 * token["distance_before"]
    assert abs(no_token["toward_concept"]) < token["toward_concept"] / 3, "the concept leaks into other prompts"


# conv_alpha 1 (LyCORIS's usual): the ResNet convolutions see no text, so what they learn shows with
# every prompt. The tiny model's convolutions are so narrow (32-64 channels) that LoKr's factors
# there are full matrices with scale 1, whatever conv_alpha; measured on this base they carry the
# concept into the other prompts (with the token 0.41 toward the concept, without it 0.13 at
# 1e-2), so LoKr is measured on the attention layers here; its convolutions are checked against
# lycoris-lora in test_lycoris.py.
@pytest.mark.parametrize("network_type,learning_rate,conv_rank", [
    ("locon", 5e-3, 4), ("loha", 5e-3, 4), ("lokr", 1e-2, 0)])
def test_every_lycoris_type_with_prior_preservation_learns_the_concept_for_the_token(
        base, concept, world, tmp_path, network_type, learning_rate, conv_rank):
    config = LoRAConfig(rank=4, alpha=4, conv_rank=conv_rank, conv_alpha=1, network_type=network_type)
    result = train_lora(base, concept, config, train_config(tmp_path, network_type, 100, learning_rate, 4),
                        regularization=world)
    captions = world_images()[1]
    figures = learning_figures(base, result.adapter.attached, [TOKEN] + captions)
    token, no_token = figures[TOKEN], mean_figures([figures[c] for c in captions])
    print(f"\n{network_type} with prior preservation: with the token {token}; without it {no_token}")
    assert token["toward_concept"] > 0.1, "the token's outputs did not move toward the concept"
    assert token["distance_after"] < 0.92 * token["distance_before"]
    assert abs(no_token["toward_concept"]) < token["toward_concept"] / 3, "the concept leaks into other prompts"


def test_hypernetwork_moves_outputs_toward_the_dataset(base, concept, tmp_path):
    result = train_hypernetwork(base, concept, HypernetworkConfig(layer_structure="1,2,1", activation="relu"),
                                train_config(tmp_path, "hypernetwork", 150, 1e-2, 6))
    token = learning_figures(base, lambda: result.adapter.attached(base.unet), [TOKEN])[TOKEN]
    print(f"\nhypernetwork: {token}")
    assert token["toward_concept"] > 0.05, "the outputs did not move toward the dataset"
    assert token["distance_after"] < 0.97 * token["distance_before"]


EMBEDDING = "skkmtn_emb"
EMBEDDING_STEPS = 100


@pytest.fixture(scope="module")
def embeddings(base, concept, tmp_path_factory):
    """Textual inversion and DreamArtist trained the same number of steps, each at its default
    learning rate, on the concept's captions with the trigger word read as the embedding."""
    dataset = embedding_dataset(concept, EMBEDDING, None)
    trained = {}
    for mode in ("textual_inversion", "dreamartist"):
        config = train_config(tmp_path_factory.mktemp(mode), EMBEDDING, EMBEDDING_STEPS,
                              default_learning_rate(mode), 6)
        trained[mode] = train_embedding(base, dataset, EmbeddingConfig(mode=mode), config).adapter
    return trained


def embedding_report(base, vectors, negative_prompt):
    """Figures with the embedding alone (no guidance) and with guidance at the training scale 3."""
    attached = lambda: vectors.attached(base)  # noqa: E731
    prompt = f"embedding:{EMBEDDING}"
    return {"alone": learning_figures(base, attached, [prompt])[prompt],
            "guided": guided_figures(base, attached, prompt, negative_prompt, 3.0)}


def test_embedding_prompts_without_it_give_exactly_the_base_output(base, embeddings):
    for mode, vectors in embeddings.items():
        for caption in world_images()[1][:3] + [TOKEN]:
            before = predicted_latents(base, caption)
            with vectors.attached(base):
                assert torch.equal(predicted_latents(base, caption), before), (mode, caption)


def test_textual_inversion_and_dreamartist_move_toward_the_concept(base, embeddings):
    figures = {
        "textual_inversion": embedding_report(base, embeddings["textual_inversion"], ""),
        "dreamartist": embedding_report(base, embeddings["dreamartist"], f"embedding:{EMBEDDING}-neg"),
    }
    print(f"\nembeddings after {EMBEDDING_STEPS} steps (alone: embedding:{EMBEDDING} without guidance; guided: "
          f"cfg 3 with an empty negative (TI) or embedding:{EMBEDDING}-neg (DreamArtist)):")
    for mode, figure in figures.items():
        print(f"  {mode}: {figure}")
    for mode, figure in figures.items():
        assert figure["alone"]["toward_concept"] > 0.08, mode
        assert figure["alone"]["distance_after"] < 0.97 * figure["alone"]["distance_before"], mode
        assert figure["guided"]["toward_concept"] > 0.08, mode
