"""A stand-in for nodes/comfy_bridge.py, so the glue tests check the nodes' own code without
ComfyUI. The integration tests run the same nodes against the real bridge in a real ComfyUI."""
import contextlib
import types


class FakeBridge(types.SimpleNamespace):
    """Records what the training and merge nodes ask of ComfyUI; returns tagged stand-ins."""

    class Interrupted(Exception):
        pass

    def __init__(self, state_dict=None, key_map=None, unmatched=()):
        super().__init__(calls=[], state_dict=state_dict, key_map=key_map, unmatched=list(unmatched),
                         progress=None, cancel_pressed=False)

    def check_sd1(self, model):
        self.calls.append(("check_sd1", model))

    def build_parts(self, model, clip, vae):
        self.calls.append(("build_parts", model, clip, vae))
        return types.SimpleNamespace(unet="unet", text_encoder="text_encoder", base_model_name="")

    def checkpoint_name(self, prompt, node_id):
        return f"checkpoint of node {node_id} in {prompt}"

    def training_models(self, model, clip):
        self.calls.append(("training_models", model, clip))
        return contextlib.nullcontext((model, clip))

    def training_context(self, *modules):
        self.calls.append(("training_context",) + modules)
        return contextlib.nullcontext()

    def ComfyCallbacks(self, total_steps, node_id):
        bridge = self

        class Progress:
            # Set when the Cancel button was pressed during the run.
            interrupted = bridge.cancel_pressed

            def callbacks(self):
                return "callbacks"

            def raise_if_interrupted(self):
                if self.interrupted:
                    bridge.raise_interrupted()
        self.progress = Progress()
        self.calls.append(("progress", total_steps, node_id))
        return self.progress

    def raise_interrupted(self):
        raise FakeBridge.Interrupted()

    def unmatched_lora_keys(self, model, clip, state_dict):
        return self.unmatched

    def apply_lora(self, model, clip, state_dict):
        return f"{model}+lora", f"{clip}+lora"

    def to_lora_model(self, state_dict):
        return {"lora_model": state_dict}

    def to_loss_map(self, losses):
        return {"loss": [v for _, v in losses]}

    def apply_hypernetwork(self, model, hypernetwork, strength):
        self.calls.append(("apply_hypernetwork", model, hypernetwork, strength))
        return f"{model}+hypernetwork@{strength:g}"

    def checkpoint_state_dict(self, model, clip, vae):
        self.calls.append(("checkpoint_state_dict", model, clip, vae))
        return {k: v.clone() for k, v in self.state_dict.items()}

    def base_model_hash(self, model, clip, vae):
        return "basehash"

    def checkpoint_lora_keys(self, model, clip):
        return dict(self.key_map)

    def models_from_checkpoint_state_dict(self, state_dict):
        self.calls.append(("models_from_checkpoint_state_dict", state_dict))
        return "MERGED_MODEL", "MERGED_CLIP"

    def add_embedding_support(self, parts, clip):
        self.calls.append(("add_embedding_support", clip))

    def clip_finding_embeddings_in(self, clip, folder):
        return f"{clip}+embeddings"
