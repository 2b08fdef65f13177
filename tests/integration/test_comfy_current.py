"""The pack against the contracts of current ComfyUI, reproduced on the ComfyUI under test.

Newer ComfyUI than the checkouts these tests can run changed four things the bridge meets.
Each test below rebuilds one of those contracts from the newest stored source
(Comfy-Org/ComfyUI, comfyui_version 0.38.1; files read at the commits named) on top of the
running ComfyUI's own classes, and runs the pack's code through it:

- dynamic VRAM: comfy/model_patcher.py @08d0e510, class ModelPatcherDynamic;
  comfy/sd.py @033046cc, CLIP.clone / CLIP.is_dynamic; comfy/model_management.py @02b2b388,
  `in_training = False` under "Training Related State";
- saving: comfy/sd.py @033046cc, save_checkpoint and CLIP.state_dict_for_saving;
  comfy/model_patcher.py @08d0e510, ModelPatcher.state_dict_for_saving,
  model_state_dict_for_saving and LazyCastingParam; comfy/model_base.py @094c74c1,
  BaseModel.state_dict_for_saving(self, unet_state_dict, clip_state_dict=None, ...);
- progress: comfy/utils.py @09708eae, ProgressBar.update_absolute with
  PROGRESS_THROTTLE_MIN_INTERVAL = 0.1 and PROGRESS_THROTTLE_MIN_PERCENT = 0.5 (first, final
  and preview updates always sent);
- template files: app/custom_node_manager.py @fcd026bf, get_workflow_template_file (serves
  ".json" only), and server.py @002c3fb9, PromptServer.add_routes (custom nodes' routes first,
  each copied under /api).

The search tools that hold that source show no line numbers, so each contract is cited by file,
commit and the function or statement it mirrors.
"""
import asyncio
import os
import time
import types

import pytest
import torch

from comfy_harness import CHECKPOINT_NAME, PACK_NAME, REPO

DYNAMIC_REFUSES = "ModelPatcherDynamic refuses force_patch_weights"


def streaming_patcher_class():
    """ModelPatcherDynamic's contract on the running ComfyUI's ModelPatcher.

    As in newest comfy/model_patcher.py: is_dynamic() is True; load and partially_load
    `assert not force_patch_weights` (and load `assert not full_load`); the weights stay on
    the CPU and every Linear/Conv casts them to its input's device per call (comfy_cast_weights,
    the patches applied on the fly); patch_model `assert not load_weights`; and
    clone(disable_dynamic=True) rebuilds the model through cached_patcher_init, or raises
    RuntimeError("Cannot create non-dynamic delegate: cached_patcher_init is not initialized.").
    """
    import comfy.model_patcher

    class StreamingPatcher(comfy.model_patcher.ModelPatcher):
        cached_patcher_init = None

        def is_dynamic(self):
            return True

        def load(self, device_to=None, lowvram_model_memory=0, force_patch_weights=False, full_load=False, **kw):
            assert not force_patch_weights, DYNAMIC_REFUSES
            assert not full_load
            # The running ComfyUI's low-VRAM load with no room for weights: every weight stays
            # where it is and is cast, patched, per call; as a dynamic model streams them.
            return super().load(device_to, lowvram_model_memory=1, force_patch_weights=False, full_load=False, **kw)

        def partially_load(self, device_to, extra_memory=0, force_patch_weights=False):
            assert not force_patch_weights, DYNAMIC_REFUSES
            # As ModelPatcherDynamic.partially_load: unpatch, then load() streamed, every time
            # (weights written in place by an earlier non-dynamic load of the shared model are restored).
            with self.use_ejected(skip_and_inject_on_exit_only=True):
                self.unpatch_model(self.offload_device, unpatch_weights=True)
                self.patch_model(load_weights=False)
                self.load(device_to)
            return None

        def patch_model(self, device_to=None, lowvram_model_memory=0, load_weights=True, force_patch_weights=False):
            assert not load_weights
            return super().patch_model(device_to, lowvram_model_memory, load_weights, force_patch_weights)

        def clone(self, disable_dynamic=False):
            n = super().clone()
            n.cached_patcher_init = self.cached_patcher_init
            if disable_dynamic:
                if self.cached_patcher_init is None:
                    raise RuntimeError("Cannot create non-dynamic delegate: cached_patcher_init is not initialized.")
                fresh = self.cached_patcher_init[0](*self.cached_patcher_init[1], disable_dynamic=True)
                n.__class__ = comfy.model_patcher.ModelPatcher
                n.model, n.backup, n.object_patches_backup = fresh.model, {}, {}
            return n

    return StreamingPatcher


def streaming_clip(clip, patcher_class, reload=None):
    """A CLIP whose patcher streams, with newest CLIP's is_dynamic() and clone(disable_dynamic)
    (which keeps the old cond_stage_model beside the rebuilt patcher, as newest CLIP.clone does)."""
    import comfy.sd

    class StreamingCLIP(comfy.sd.CLIP):
        def is_dynamic(self):
            return self.patcher.is_dynamic()

        def clone(self, disable_dynamic=False):
            n = super().clone()
            n.__class__ = StreamingCLIP
            n.patcher = self.patcher.clone(disable_dynamic=disable_dynamic)
            n.cond_stage_model = self.cond_stage_model
            return n

    streaming = clip.clone()
    streaming.__class__ = StreamingCLIP
    streaming.patcher.__class__ = patcher_class
    streaming.patcher.cached_patcher_init = reload
    return streaming


def streaming_model(model, patcher_class, reload=None):
    streaming = model.clone()
    streaming.__class__ = patcher_class
    streaming.cached_patcher_init = reload
    return streaming


def reload_part(index):
    """A cached_patcher_init factory: the tiny checkpoint loaded again, one part of it."""
    import comfy.sd
    import folder_paths

    def reload(name, disable_dynamic=False):
        assert disable_dynamic
        model, clip, _, _ = comfy.sd.load_checkpoint_guess_config(
            folder_paths.get_full_path_or_raise("checkpoints", name))
        return model if index == 0 else clip.patcher
    return reload, (CHECKPOINT_NAME,)


@pytest.fixture
def in_training_flag(monkeypatch):
    """comfy.model_management.in_training as newest ComfyUI defines it (False when idle)."""
    import comfy.model_management
    monkeypatch.setattr(comfy.model_management, "in_training", False, raising=False)
    return comfy.model_management


def tiny_dataset(comfyui):
    dataset = comfyui.pack_module("trainer_core.dataset")
    config = dataset.DatasetConfig(folder=os.path.join(REPO, "sample_dataset"), instance_token="skkmtn",
                                   class_token="creature", resolution=64)
    return dataset.ImageDataset.from_folder(config)


def train_two_steps(comfyui, model, clip, vae, output_dir, train_text_encoder):
    """LoRATrain's training run (nodes/training_run.run_training) for two steps; returns the
    result and what the trainer saw: its parts and in_training while it trained."""
    import comfy.model_management
    run = comfyui.pack_module("nodes.training_run")
    lora = comfyui.pack_module("trainer_core.adapters.lora")
    config = comfyui.pack_module("trainer_core.config")
    train = comfyui.pack_module("trainer_core.train")
    seen = {}

    def two_steps(parts, callbacks):
        seen["parts"] = parts

        def on_step(step, total, loss):
            seen["in_training"] = getattr(comfy.model_management, "in_training", None)
            callbacks.on_step(step, total, loss)

        return train.train_lora(
            parts, tiny_dataset(comfyui), lora.LoRAConfig(rank=2, alpha=2.0, train_text_encoder=train_text_encoder),
            config.TrainConfig(output_dir=output_dir, output_name="dynamic", steps=2, seed=0, force_retrain=True,
                               overwrite=True),
            callbacks=train.Callbacks(on_step=on_step, on_preview=callbacks.on_preview,
                                      should_stop=callbacks.should_stop))

    hidden = types.SimpleNamespace(unique_id="7", prompt={})
    with torch.inference_mode():
        result = run.run_training(model, clip, vae, 2, hidden, two_steps, train_text_encoder=train_text_encoder)
    seen["lora_devices"] = {p.device for p in result.adapter.parameters()}
    return result, seen


def unet_weights(model):
    return {k: v.detach().clone() for k, v in model.model.diffusion_model.state_dict().items()}


def fresh(comfyui):
    """A checkpoint load of its own: a streaming clone shares its BaseModel with the original,
    and a model another test loaded fully would not stream."""
    model, clip, vae = comfyui.load_checkpoint(CHECKPOINT_NAME)
    return types.SimpleNamespace(model=model, clip=clip, vae=vae)


def test_a_dynamic_model_from_a_loader_trains_on_a_non_dynamic_clone_and_its_clip_streamed_with_in_training_set(
        comfyui, tiny_checkpoint, in_training_flag, tmp_path):
    loaded = fresh(comfyui)
    patcher_class = streaming_patcher_class()
    model = streaming_model(loaded.model, patcher_class, reload_part(0))
    clip = streaming_clip(loaded.clip, patcher_class, reload_part(1))
    before = unet_weights(model)

    result, seen = train_two_steps(comfyui, model, clip, loaded.vae, str(tmp_path), train_text_encoder=True)

    parts = seen["parts"]
    assert parts.unet is not model.model.diffusion_model, "trained on the rebuilt non-dynamic model"
    assert parts.text_encoder is clip.cond_stage_model, "the text encoder trains streamed, as given"
    assert seen["in_training"] is True and in_training_flag.in_training is False
    assert seen["lora_devices"] == {parts.device} and parts.text_encoder_device == clip.patcher.load_device
    assert len(result.losses) == 2 and all(loss == loss for _, loss in result.losses)
    assert all(torch.equal(v, before[k]) for k, v in unet_weights(model).items())


def test_a_dynamic_model_no_loader_can_rebuild_trains_streamed_with_its_weights_left_on_the_cpu(
        comfyui, tiny_checkpoint, in_training_flag, tmp_path):
    loaded = fresh(comfyui)
    patcher_class = streaming_patcher_class()
    model = streaming_model(loaded.model, patcher_class)  # no cached_patcher_init: bypass mode
    clip = streaming_clip(loaded.clip, patcher_class)
    before = unet_weights(model)
    with pytest.raises(RuntimeError, match="cached_patcher_init"):
        model.clone(disable_dynamic=True)

    result, seen = train_two_steps(comfyui, model, clip, loaded.vae, str(tmp_path), train_text_encoder=True)

    parts = seen["parts"]
    assert parts.unet is model.model.diffusion_model and parts.text_encoder is clip.cond_stage_model
    linears = [m for m in parts.unet.modules() if isinstance(m, torch.nn.Linear)]
    assert all(m.comfy_cast_weights and m.weight.device.type == "cpu" for m in linears), \
        "the weights stayed on the CPU, cast per call"
    assert seen["lora_devices"] == {parts.device}, "adapters sit where the layers compute"
    assert seen["in_training"] is True and in_training_flag.in_training is False
    assert len(result.losses) == 2 and all(loss == loss for _, loss in result.losses)
    assert all(torch.equal(v, before[k]) for k, v in unet_weights(model).items())


def record_moves(module, moves):
    """Records where `module` is asked to go instead of moving it."""
    def to(*args, device=None, **kwargs):
        moves.append(device)
        return module
    module.to = to


def test_adapters_are_placed_on_the_compute_device_not_the_weights_device(comfyui, tiny_checkpoint):
    """A dynamic layer's weight is on the CPU while it computes on the GPU, which a CPU-only
    machine cannot run; so the adapters are asked where they go, with "meta" standing for the
    GPU the UNet computes on."""
    loaded = fresh(comfyui)
    bridge = comfyui.pack_module("nodes.comfy_bridge")
    lora = comfyui.pack_module("trainer_core.adapters.lora")
    hypernetwork = comfyui.pack_module("trainer_core.adapters.hypernetwork")
    unet_targets = bridge.unet_lora_targets(loaded.model)
    te_targets = bridge.text_encoder_lora_targets(loaded.clip)
    assert all(t.weight.device.type == "cpu" for t in [*unet_targets.values(), *te_targets.values()])
    network = lora.LoRANetwork(unet_targets, te_targets, lora.LoRAConfig(train_text_encoder=True))
    unet_moves, te_moves = [], []
    for module in network.unet_loras.values():
        record_moves(module, unet_moves)
    for module in network.text_encoder_loras.values():
        record_moves(module, te_moves)
    meta, cpu = torch.device("meta"), torch.device("cpu")
    with network.attached(meta, cpu):
        pass
    assert set(unet_moves) == {meta} and len(unet_moves) == len(unet_targets)
    assert set(te_moves) == {cpu} and len(te_moves) == len(te_targets)

    unet = loaded.model.model.diffusion_model
    net = hypernetwork.Hypernetwork.for_unet(unet, hypernetwork.HypernetworkConfig())
    moves = []
    record_moves(net, moves)
    with net.attached(unet, meta):
        pass
    assert moves == [meta]


def test_comparison_pictures_lora_and_hypernetwork_on_a_dynamic_model_equal_those_on_a_plain_one(
        comfyui, tiny_checkpoint):
    """What TriggerComparison / StepComparisonGrid (bridge.KSamplerPictures, bridge.apply_lora)
    and ApplyHypernetwork (bridge.apply_hypernetwork) do, on a streamed model and on a plain one."""
    from test_merge_node import random_lora_state_dict
    bridge = comfyui.pack_module("nodes.comfy_bridge")
    hypernetwork = comfyui.pack_module("trainer_core.adapters.hypernetwork")
    patcher_class = streaming_patcher_class()
    plain, streamed = fresh(comfyui), fresh(comfyui)
    streamed.model = streaming_model(streamed.model, patcher_class)
    streamed.clip = streaming_clip(streamed.clip, patcher_class)
    lora = random_lora_state_dict(plain.model, plain.clip)
    torch.manual_seed(0)
    net = hypernetwork.Hypernetwork.for_unet(plain.model.model.diffusion_model, hypernetwork.HypernetworkConfig())
    for parameter in net.parameters():
        torch.nn.init.normal_(parameter, std=0.05)

    def pictures(loaded):
        pictures = bridge.KSamplerPictures(loaded.vae, 3, 2, 7.0, "euler", "normal", 64, 64, 3)
        with torch.inference_mode():
            base = pictures.picture(loaded.model, loaded.clip, "skkmtn", "blurry")
            with_lora = pictures.picture(*bridge.apply_lora(loaded.model, loaded.clip, lora), "skkmtn", "blurry")
            with_hypernetwork = pictures.picture(bridge.apply_hypernetwork(loaded.model, net, 1.0), loaded.clip,
                                                 "skkmtn", "blurry")
        return base, with_lora, with_hypernetwork

    expected, got = pictures(plain), pictures(streamed)
    assert streamed.model.is_dynamic() and streamed.clip.is_dynamic()
    assert not torch.equal(expected[0], expected[1]) and not torch.equal(expected[0], expected[2]), \
        "the LoRA and the hypernetwork each change the picture"
    # A streamed layer adds the LoRA to its weight at each call, a plain one once, in place: the
    # same sums in another order, which 2 sampling steps of the random tiny model magnify.
    differences = [(mine - theirs).abs() for mine, theirs in zip(got, expected)]
    print("largest, mean pixel difference (base, LoRA, hypernetwork):",
          [(float(d.max()), float(d.mean())) for d in differences])
    assert float(differences[0].max()) < 1e-4 and float(differences[2].max()) < 1e-4
    assert float(differences[1].max()) < 0.05 and float(differences[1].mean()) < 1e-3


def lazy_casting_param_class():
    """newest comfy/model_patcher.py LazyCastingParam: a Parameter holding the stored weight
    whose .to() returns the patched weight on the CPU (.detach() gives the stored one)."""
    import comfy.lora

    class LazyCastingParam(torch.nn.Parameter):
        def __new__(cls, patcher, key, tensor):
            return super().__new__(cls, tensor, requires_grad=False)

        def __init__(self, patcher, key, tensor):
            self.patcher, self.key = patcher, key

        def to(self, *args, **kwargs):
            weight = torch.Tensor.to(self, torch.float32, copy=True).detach()
            patched = comfy.lora.calculate_weight(self.patcher.patches[self.key], weight, self.key)
            return patched.to(self.dtype).to("cpu")

    return LazyCastingParam


def newest_saving(model, clip, patcher_class):
    """The MODEL and CLIP with newest ComfyUI's saving contract: ModelPatcher.state_dict_for_saving,
    CLIP.state_dict_for_saving, patched weights as LazyCastingParam, and BaseModel's new
    signature state_dict_for_saving(unet_state_dict, clip_state_dict=None, vae_state_dict=None, ...)."""
    import comfy.model_base
    lazy = lazy_casting_param_class()

    def model_state_dict_for_saving(patcher, module, prefix=""):
        out = {}
        for k, v in module.state_dict().items():
            out[k] = lazy(patcher, prefix + k, v) if prefix + k in patcher.patches else v
        return out

    class SavingPatcher(patcher_class):
        def state_dict_for_saving(self, clip_state_dict=None, vae_state_dict=None, clip_vision_state_dict=None):
            unet = model_state_dict_for_saving(self, self.model.diffusion_model, "diffusion_model.")
            return self.model.state_dict_for_saving(unet, clip_state_dict=clip_state_dict,
                                                    vae_state_dict=vae_state_dict,
                                                    clip_vision_state_dict=clip_vision_state_dict)

    base = model.model
    config = base.model_config

    def base_state_dict_for_saving(unet_state_dict, clip_state_dict=None, vae_state_dict=None,
                                   clip_vision_state_dict=None):
        extra = []
        if clip_state_dict is not None:
            extra.append(config.process_clip_state_dict_for_saving(clip_state_dict))
        if vae_state_dict is not None:
            extra.append(config.process_vae_state_dict_for_saving(vae_state_dict))
        if clip_vision_state_dict is not None:
            extra.append(config.process_clip_vision_state_dict_for_saving(clip_vision_state_dict))
        unet_state_dict = config.process_unet_state_dict_for_saving(unet_state_dict)
        if base.model_type == comfy.model_base.ModelType.V_PREDICTION:
            unet_state_dict["v_pred"] = torch.tensor([])
        for sd in extra:
            unet_state_dict.update(sd)
        return unet_state_dict

    saving_model = model.clone()
    saving_model.__class__ = SavingPatcher
    saving_clip = clip.clone()
    saving_clip.patcher.__class__ = patcher_class

    def clip_state_dict_for_saving():
        state = model_state_dict_for_saving(saving_clip.patcher, saving_clip.cond_stage_model)
        state.update(saving_clip.tokenizer.state_dict())
        return state

    saving_clip.state_dict_for_saving = clip_state_dict_for_saving
    return saving_model, saving_clip, base_state_dict_for_saving


def test_merge_builds_the_checkpoint_as_newer_save_checkpoint_does_with_the_patches_baked_in(
        comfyui, tiny_checkpoint, monkeypatch):
    from test_merge_node import random_lora_state_dict
    bridge = comfyui.pack_module("nodes.comfy_bridge")
    # The running ComfyUI's own way (its save_checkpoint), on one load ...
    old = fresh(comfyui)
    lora = random_lora_state_dict(old.model, old.clip)
    with torch.inference_mode():
        expected = bridge.checkpoint_state_dict(*bridge.apply_lora(old.model, old.clip, lora), old.vae)
    # ... and newest ComfyUI's, on another (patched weights are never written into a streamed model).
    loaded = fresh(comfyui)
    patched_model, patched_clip = bridge.apply_lora(loaded.model, loaded.clip, lora)
    model, clip, base_saving = newest_saving(patched_model, patched_clip, streaming_patcher_class())
    monkeypatch.setattr(model.model, "state_dict_for_saving", base_saving)
    with torch.inference_mode():
        merged = bridge.checkpoint_state_dict(model, clip, loaded.vae)

    assert set(merged) == set(expected)
    changed = [k for k in expected if k.startswith("model.diffusion_model.") and k[len("model."):] in model.patches]
    assert changed and all(not torch.equal(merged[k], loaded.model.model.state_dict()[k[len("model."):]])
                           for k in changed), "the LoRA is baked into the saved UNet weights"
    assert all(torch.allclose(merged[k].float(), expected[k].float(), rtol=1e-5, atol=1e-6) for k in expected)
    assert all(v.device.type == "cpu" and not isinstance(v, torch.nn.Parameter) for v in merged.values())


def throttled_progress_bar_class():
    """newest comfy/utils.py ProgressBar.update_absolute: a first, a final and every preview
    update reach the hook; others only after PROGRESS_THROTTLE_MIN_INTERVAL (0.1 s) and
    PROGRESS_THROTTLE_MIN_PERCENT (0.5 %) of progress."""
    import comfy.utils
    min_interval, min_percent = 0.1, 0.5

    class ThrottledProgressBar(comfy.utils.ProgressBar):
        def __init__(self, total, node_id=None):
            super().__init__(total, node_id=node_id)
            self._last_update_time = 0.0
            self._last_sent_value = -1

        def update_absolute(self, value, total=None, preview=None):
            if total is not None:
                self.total = total
            value = min(value, self.total)
            self.current = value
            if self.hook is None:
                return
            now = time.perf_counter()
            if preview is not None or self._last_sent_value < 0 or value >= self.total:
                self.hook(self.current, self.total, preview, node_id=self.node_id)
                self._last_update_time, self._last_sent_value = now, value
                return
            percent = (value - max(0, self._last_sent_value)) / self.total * 100 if self.total > 0 else 100
            if now - self._last_update_time >= min_interval and percent >= min_percent:
                self.hook(self.current, self.total, preview, node_id=self.node_id)
                self._last_update_time, self._last_sent_value = now, value

    return ThrottledProgressBar


def test_first_last_and_preview_updates_pass_the_progress_throttle_and_cancel_is_still_seen(
        comfyui, monkeypatch):
    import comfy.model_management
    import comfy.utils
    from PIL import Image
    bridge = comfyui.pack_module("nodes.comfy_bridge")
    monkeypatch.setattr(comfy.utils, "ProgressBar", throttled_progress_bar_class())
    comfyui.progress.clear()
    total = 1000
    progress = bridge.ComfyCallbacks(total, "9")
    callbacks = progress.callbacks()
    picture = Image.new("RGB", (8, 8))
    for step in range(1, total + 1):  # far faster than 0.1 s a step: most updates are throttled
        callbacks.on_step(step, total, 0.5)
        if step == 500:
            callbacks.on_preview(step, picture)
    sent = [(value, has_preview) for node, value, _, has_preview in comfyui.progress if node == "9"]
    assert sent[0] == (1, False) and sent[-1] == (total, False)
    assert (500, True) in sent
    assert len(sent) < total / 10, "the throttle is in effect"

    progress = bridge.ComfyCallbacks(total, "9")
    callbacks = progress.callbacks()
    callbacks.on_step(1, total, 0.5)
    comfy.model_management.interrupt_current_processing(True)
    try:
        callbacks.on_step(2, total, 0.5)  # throttled: the hook, which raises on Cancel, is not called
        assert callbacks.should_stop(), "the trainer's step check sees Cancel without the hook"
    finally:
        comfy.model_management.interrupt_current_processing(False)


def test_template_thumbnails_are_served_ahead_of_the_newer_json_only_template_route(comfyui):
    from aiohttp import web
    from aiohttp.test_utils import TestClient, TestServer
    templates = comfyui.pack_module("nodes.templates")

    routes = web.RouteTableDef()
    templates.register_thumbnail_route(routes)  # while the pack loads

    @routes.get("/workflow_templates/{module_name}/{filename}")  # then core's, json only
    async def get_workflow_template_file(request):
        filename = request.match_info["filename"]
        if not filename.endswith(".json"):
            raise web.HTTPNotFound()
        return web.json_response({"core": filename})

    app = web.Application()
    api_routes = web.RouteTableDef()  # PromptServer.add_routes: every route again under /api
    for route in routes:
        if isinstance(route, web.RouteDef):
            api_routes.route(route.method, "/api" + route.path)(route.handler, **route.kwargs)
    app.add_routes(api_routes)
    app.add_routes(routes)

    names = sorted(os.path.splitext(f)[0] for f in os.listdir(templates.WORKFLOWS_DIR) if f.endswith(".jpg"))
    assert names

    async def fetch():
        async with TestClient(TestServer(app)) as client:
            answers = {}
            for name in names:
                response = await client.get(f"/api/workflow_templates/{PACK_NAME}/{name}.jpg")
                answers[name] = (response.status, response.content_type, await response.read())
            json_answer = await client.get(f"/api/workflow_templates/{PACK_NAME}/{names[0]}.json")
            missing = await client.get(f"/api/workflow_templates/{PACK_NAME}/no_such_workflow.jpg")
            return answers, (json_answer.status, await json_answer.json()), missing.status

    answers, json_answer, missing = asyncio.run(fetch())
    for name, (status, content_type, body) in answers.items():
        with open(os.path.join(templates.WORKFLOWS_DIR, name + ".jpg"), "rb") as f:
            assert (status, content_type, body) == (200, "image/jpeg", f.read()), name
    assert json_answer == (200, {"core": f"{names[0]}.json"}), "the workflow files stay core's"
    assert missing == 404
