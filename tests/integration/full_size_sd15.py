"""A random-weight checkpoint with the whole SD1.5 architecture, written without a download.

    python tests/integration/full_size_sd15.py PATH     # writes PATH (about 2.1 GB), unless it exists

The file is a single-file LDM checkpoint as SD1.5 releases are: `model.diffusion_model.*` (the
UNet: model_channels 320, channel_mult 1,2,4,4, 2 res blocks per level, attention at the first
three levels and in the middle block, 768-wide cross-attention), `cond_stage_model.transformer.
text_model.*` (CLIP ViT-L/14 text encoder, 12 layers) and `first_stage_model.*` (the SD VAE).
ComfyUI detects it as SD15 and the trainer's diffusers backend loads it. Step time and memory
do not depend on the weight values, so seeded random weights stand in for trained ones.

The layout is listed here from the architecture (no ComfyUI, diffusers or transformers needed),
so benchmarks and the GPU check can write it on a bare machine. The tensors are generated and
written one at a time, in fp16, straight into the .safetensors file: writing needs about as much
memory as the largest tensor (the 49408 x 768 token embedding), not the 2.1 GB file.
`tests/test_full_size_fixture.py` checks the layout against diffusers' own converter, and the
integration tests check that ComfyUI loads it as SD15.

Other code finds the file through `cached_full_size_sd15()`: the path in $SD15_FULL_SIZE_CHECKPOINT
if set (written there on first use and reused after), else a file in the given folder.
"""
from __future__ import annotations

import json
import math
import os
import struct
import sys
import tempfile

import torch

CACHE_ENV = "SD15_FULL_SIZE_CHECKPOINT"
FILE_NAME = "full_size_sd15_random.safetensors"
SEED = 0

MODEL_CHANNELS = 320
CHANNEL_MULT = (1, 2, 4, 4)
NUM_RES_BLOCKS = 2
ATTENTION_LEVELS = (0, 1, 2)
TIME_EMBED = MODEL_CHANNELS * 4
CONTEXT_DIM = 768
TEXT_LAYERS = 12
TEXT_WIDTH = 768
TEXT_MLP = 3072
VOCAB = 49408
TOKENS = 77
VAE_CHANNELS = 128
VAE_MULT = (1, 2, 4, 4)
VAE_RES_BLOCKS = 2
LATENT_CHANNELS = 4


# -- the layout: (name, shape) in file order ------------------------------------------------------
def _norm(prefix, channels):
    return [(f"{prefix}.weight", (channels,)), (f"{prefix}.bias", (channels,))]


def _linear(prefix, features_in, features_out, bias=True):
    return [(f"{prefix}.weight", (features_out, features_in))] + ([(f"{prefix}.bias", (features_out,))] if bias else [])


def _conv(prefix, channels_in, channels_out, kernel=3):
    return [(f"{prefix}.weight", (channels_out, channels_in, kernel, kernel)), (f"{prefix}.bias", (channels_out,))]


def _unet_res_block(prefix, channels_in, channels_out):
    tensors = (_norm(f"{prefix}.in_layers.0", channels_in) + _conv(f"{prefix}.in_layers.2", channels_in, channels_out)
               + _linear(f"{prefix}.emb_layers.1", TIME_EMBED, channels_out)
               + _norm(f"{prefix}.out_layers.0", channels_out) + _conv(f"{prefix}.out_layers.3", channels_out, channels_out))
    if channels_in != channels_out:
        tensors += _conv(f"{prefix}.skip_connection", channels_in, channels_out, kernel=1)
    return tensors


def _spatial_transformer(prefix, channels):
    block = f"{prefix}.transformer_blocks.0"
    tensors = _norm(f"{prefix}.norm", channels) + _conv(f"{prefix}.proj_in", channels, channels, kernel=1)
    for attention, context in (("attn1", channels), ("attn2", CONTEXT_DIM)):
        tensors += (_linear(f"{block}.{attention}.to_q", channels, channels, bias=False)
                    + _linear(f"{block}.{attention}.to_k", context, channels, bias=False)
                    + _linear(f"{block}.{attention}.to_v", context, channels, bias=False)
                    + _linear(f"{block}.{attention}.to_out.0", channels, channels))
    tensors += (_linear(f"{block}.ff.net.0.proj", channels, channels * 8)  # GEGLU: value and gate
                + _linear(f"{block}.ff.net.2", channels * 4, channels))
    for norm in ("norm1", "norm2", "norm3"):
        tensors += _norm(f"{block}.{norm}", channels)
    return tensors + _conv(f"{prefix}.proj_out", channels, channels, kernel=1)


def unet_layout() -> list:
    """The SD1.5 UNet as ComfyUI's (and the original LDM) UNetModel names its tensors."""
    tensors = _linear("time_embed.0", MODEL_CHANNELS, TIME_EMBED) + _linear("time_embed.2", TIME_EMBED, TIME_EMBED)
    tensors += _conv("input_blocks.0.0", 4, MODEL_CHANNELS)
    skip_channels, channels, block = [MODEL_CHANNELS], MODEL_CHANNELS, 1
    for level, mult in enumerate(CHANNEL_MULT):
        for _ in range(NUM_RES_BLOCKS):
            out = MODEL_CHANNELS * mult
            tensors += _unet_res_block(f"input_blocks.{block}.0", channels, out)
            channels = out
            if level in ATTENTION_LEVELS:
                tensors += _spatial_transformer(f"input_blocks.{block}.1", channels)
            skip_channels.append(channels)
            block += 1
        if level != len(CHANNEL_MULT) - 1:
            tensors += _conv(f"input_blocks.{block}.0.op", channels, channels)
            skip_channels.append(channels)
            block += 1
    tensors += (_unet_res_block("middle_block.0", channels, channels) + _spatial_transformer("middle_block.1", channels)
                + _unet_res_block("middle_block.2", channels, channels))
    block = 0
    for level, mult in reversed(list(enumerate(CHANNEL_MULT))):
        for i in range(NUM_RES_BLOCKS + 1):
            out = MODEL_CHANNELS * mult
            tensors += _unet_res_block(f"output_blocks.{block}.0", channels + skip_channels.pop(), out)
            channels, layer = out, 1
            if level in ATTENTION_LEVELS:
                tensors += _spatial_transformer(f"output_blocks.{block}.1", channels)
                layer = 2
            if level and i == NUM_RES_BLOCKS:
                tensors += _conv(f"output_blocks.{block}.{layer}.conv", channels, channels)
            block += 1
    return tensors + _norm("out.0", channels) + _conv("out.2", channels, 4)


def text_encoder_layout() -> list:
    """CLIP ViT-L/14's text model as transformers 4 (and SD1 files) name it, under `text_model.`."""
    tensors = [("embeddings.token_embedding.weight", (VOCAB, TEXT_WIDTH)),
               ("embeddings.position_embedding.weight", (TOKENS, TEXT_WIDTH))]
    for i in range(TEXT_LAYERS):
        layer = f"encoder.layers.{i}"
        for projection in ("k_proj", "v_proj", "q_proj", "out_proj"):
            tensors += _linear(f"{layer}.self_attn.{projection}", TEXT_WIDTH, TEXT_WIDTH)
        tensors += (_norm(f"{layer}.layer_norm1", TEXT_WIDTH) + _linear(f"{layer}.mlp.fc1", TEXT_WIDTH, TEXT_MLP)
                    + _linear(f"{layer}.mlp.fc2", TEXT_MLP, TEXT_WIDTH) + _norm(f"{layer}.layer_norm2", TEXT_WIDTH))
    return [(f"text_model.{name}", shape) for name, shape in tensors + _norm("final_layer_norm", TEXT_WIDTH)]


def _vae_res_block(prefix, channels_in, channels_out):
    tensors = (_norm(f"{prefix}.norm1", channels_in) + _conv(f"{prefix}.conv1", channels_in, channels_out)
               + _norm(f"{prefix}.norm2", channels_out) + _conv(f"{prefix}.conv2", channels_out, channels_out))
    if channels_in != channels_out:
        tensors += _conv(f"{prefix}.nin_shortcut", channels_in, channels_out, kernel=1)
    return tensors


def _vae_middle(prefix, channels):
    attention = _norm(f"{prefix}.attn_1.norm", channels)
    for projection in ("q", "k", "v", "proj_out"):
        attention += _conv(f"{prefix}.attn_1.{projection}", channels, channels, kernel=1)
    return (_vae_res_block(f"{prefix}.block_1", channels, channels) + attention
            + _vae_res_block(f"{prefix}.block_2", channels, channels))


def vae_layout() -> list:
    """The SD VAE (KL-f8, 4 latent channels) as the LDM AutoencoderKL names its tensors."""
    tensors = _conv("encoder.conv_in", 3, VAE_CHANNELS)
    channels = VAE_CHANNELS
    for level, mult in enumerate(VAE_MULT):
        out = VAE_CHANNELS * mult
        for i in range(VAE_RES_BLOCKS):
            tensors += _vae_res_block(f"encoder.down.{level}.block.{i}", channels, out)
            channels = out
        if level != len(VAE_MULT) - 1:
            tensors += _conv(f"encoder.down.{level}.downsample.conv", channels, channels)
    tensors += (_vae_middle("encoder.mid", channels) + _norm("encoder.norm_out", channels)
                + _conv("encoder.conv_out", channels, 2 * LATENT_CHANNELS))
    tensors += _conv("quant_conv", 2 * LATENT_CHANNELS, 2 * LATENT_CHANNELS, kernel=1)
    tensors += _conv("post_quant_conv", LATENT_CHANNELS, LATENT_CHANNELS, kernel=1)
    channels = VAE_CHANNELS * VAE_MULT[-1]
    tensors += _conv("decoder.conv_in", LATENT_CHANNELS, channels) + _vae_middle("decoder.mid", channels)
    for level in reversed(range(len(VAE_MULT))):
        out = VAE_CHANNELS * VAE_MULT[level]
        for i in range(VAE_RES_BLOCKS + 1):
            tensors += _vae_res_block(f"decoder.up.{level}.block.{i}", channels, out)
            channels = out
        if level:
            tensors += _conv(f"decoder.up.{level}.upsample.conv", channels, channels)
    return tensors + _norm("decoder.norm_out", channels) + _conv("decoder.conv_out", channels, 3)


def checkpoint_layout() -> list:
    """(name, shape) of every tensor of the single-file checkpoint, in file order."""
    return ([(f"model.diffusion_model.{k}", s) for k, s in unet_layout()]
            + [(f"cond_stage_model.transformer.{k}", s) for k, s in text_encoder_layout()]
            + [(f"first_stage_model.{k}", s) for k, s in vae_layout()])


# -- the weights ----------------------------------------------------------------------------------
def random_tensor(name, shape, generator) -> torch.Tensor:
    """Seeded weights that keep activations in range through the whole network, in fp16."""
    if len(shape) == 1:
        # 1-D tensors are biases (0) and normalisation scales (1).
        tensor = (torch.ones if name.endswith(".weight") else torch.zeros)(shape)
    elif "embedding" in name:
        tensor = torch.randn(shape, generator=generator) * 0.02
    else:
        tensor = torch.randn(shape, generator=generator) / math.sqrt(math.prod(shape[1:]))
    if name.startswith("first_stage_model.quant_conv."):
        # A random VAE would predict log-variance near 0 (std 1) and drown the image in noise; a
        # trained one is nearly deterministic. The posterior clamps log-variance at -30.
        tensor[LATENT_CHANNELS:] = 0 if name.endswith(".weight") else -30.0
    return tensor.to(torch.float16)


def write_full_size_sd15(path: str, seed: int = SEED, layout=None) -> str:
    """Write the checkpoint (or the tensors of `layout`) to `path`, one tensor at a time, into a
    temp file that is renamed into place."""
    layout = layout or checkpoint_layout()
    header, offset = {"__metadata__": {"format": "pt", "fixture": f"random SD1.5 architecture, seed {seed}"}}, 0
    for name, shape in layout:
        size = math.prod(shape) * 2  # fp16
        header[name] = {"dtype": "F16", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode("utf-8")
    encoded += b" " * (-len(encoded) % 8)  # safetensors pads the header to 8 bytes with spaces
    generator = torch.Generator().manual_seed(seed)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    handle, temp_path = tempfile.mkstemp(prefix=".full_size_sd15_", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(handle, "wb") as f:
            f.write(struct.pack("<Q", len(encoded)))
            f.write(encoded)
            for name, shape in layout:
                tensor = random_tensor(name, shape, generator).contiguous()
                f.write(tensor.view(torch.uint8).numpy().tobytes())
        os.replace(temp_path, path)
    except BaseException:
        if os.path.exists(temp_path):
            os.remove(temp_path)
        raise
    return path


def cached_full_size_sd15(folder: str = "") -> str:
    """The checkpoint's path, written first if it is not there yet.

    $SD15_FULL_SIZE_CHECKPOINT names the file when set, so several test sessions and benchmark
    runs share one copy; otherwise it is `folder`/full_size_sd15_random.safetensors.
    """
    path = os.environ.get(CACHE_ENV) or os.path.join(folder or tempfile.gettempdir(), FILE_NAME)
    if not os.path.isfile(path):
        write_full_size_sd15(path)
    return path


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__.strip().splitlines()[0].strip())
    target = sys.argv[1]
    if os.path.isfile(target):
        print(f"{target} exists; kept")
    else:
        import time
        started = time.perf_counter()
        write_full_size_sd15(target)
        print(f"wrote {target}: {os.path.getsize(target) / 2**30:.2f} GiB in {time.perf_counter() - started:.1f} s")
