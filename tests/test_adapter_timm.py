"""timm VisionTransformer adapter: base-model identity for every memory, XL over frames against one
block-causal pass, padding through the host's ``attn_mask``, and clear errors for what it refuses.

Notation: b batch, T frames, n tokens per frame (prefix + patches), e model dim. Models are tiny ViTs
(32×32 images, 8×8 patches: 16 patches + class token [+ registers], dim 32, depth 2).

timm's ``Attention`` accepts ``attn_mask``, so the XL reference is the host itself: its blocks run once
over the concatenated frames' tokens (each frame with its own position embeddings) with a block-causal
mask.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import Tensor, nn

import memory_plugins as mp

from .conftest import SMALL_OPTIONS, states_equal

with warnings.catch_warnings():  # torchvision's optional image extension may be missing; timm does not use it
    warnings.simplefilter("ignore", UserWarning)
    timm = pytest.importorskip("timm")
    from timm.models.vision_transformer import VisionTransformer  # noqa: E402

MEMORIES = mp.list_memories()
IMG, PATCH = 32, 8
FUSED = [True, False]


def _vit(fused: bool = True, reg_tokens: int = 0, **kw: object) -> VisionTransformer:
    vit = VisionTransformer(img_size=IMG, patch_size=PATCH, embed_dim=32, depth=2, num_heads=2, num_classes=5,
                            reg_tokens=reg_tokens, **kw)
    for block in vit.blocks:
        block.attn.fused_attn = fused  # timm's two code paths: F.scaled_dot_product_attention or its own
    return vit.eval()


def _options(name: str) -> dict:
    if name not in SMALL_OPTIONS:
        pytest.fail(f"memory {name!r} is registered but has no SMALL_OPTIONS entry in tests/conftest.py")
    return SMALL_OPTIONS[name]


def _wrapped(name: str, vit: nn.Module, **options: object) -> mp.MemoryModel:
    """Wrapped with random memory parameters, so that every memory path (zero-init outputs too) is live."""
    wrapped = mp.wrap(vit, name, **{**_options(name), **options})
    with torch.no_grad():
        for p in wrapped.memory.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return wrapped.eval()


def _frames(t: int, b: int = 2) -> Tensor:
    return torch.randn(t, b, 3, IMG, IMG)  # (T, b, 3, H, W)


def _max(a: Tensor, b: Tensor) -> float:
    return (a - b).abs().max().item()


def _block_causal(vit: VisionTransformer, frames: Tensor, window: int, keep: Tensor | None = None) -> list[Tensor]:
    """Logits of every frame from ONE pass of the ViT's blocks over all frames' tokens, frame t's queries
    seeing frames t - window … t (``keep`` (b, T·n): which keys are real; others are seen by nobody)."""
    tokens = [vit.norm_pre(vit._pos_embed(vit.patch_embed(f))) for f in frames]  # T × (b, n, e)
    n = tokens[0].shape[1]
    frame = torch.arange(len(tokens) * n) // n  # (T·n,) frame of every token
    lag = frame[:, None] - frame[None, :]  # (T·n, T·n) query frame − key frame
    mask = ((lag >= 0) & (lag <= window))[None, None]  # (1, 1, T·n, T·n)
    if keep is not None:
        mask = mask & keep[:, None, None, :]  # (b, 1, T·n, T·n)
    x = torch.cat(tokens, dim=1)  # (b, T·n, e)
    for block in vit.blocks:
        x = block(x, attn_mask=mask)
    x = vit.norm(x)
    return [vit.forward_head(x[:, t * n:(t + 1) * n]) for t in range(len(tokens))]


# -- identity ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fused", FUSED)
@pytest.mark.parametrize("name", MEMORIES)
def test_disabled_or_fresh_memory_gives_the_base_model(name: str, fused: bool) -> None:
    base = _vit(fused, reg_tokens=2)
    reference = copy.deepcopy(base)
    wrapped = _wrapped(name, base)
    frames = _frames(3)
    with torch.no_grad():
        assert _max(wrapped(frames[0]), reference(frames[0])) <= 1e-6  # first frame: empty memory
        wrapped(frames[1])
        with wrapped.memory_disabled():
            assert _max(wrapped(frames[2]), reference(frames[2])) <= 1e-6
        live = wrapped(frames[2])
    assert _max(live, reference(frames[2])) > 1e-4  # with random memory weights the memory is read


@pytest.mark.parametrize("name", MEMORIES)
def test_one_line_wrap_of_vit_tiny_patch16_224(name: str) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        base = timm.create_model("vit_tiny_patch16_224", pretrained=False).eval()
    reference = copy.deepcopy(base)
    wrapped = mp.wrap(base, name, **_options(name)).eval()  # default init
    image = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert _max(wrapped(image), reference(image)) <= 1e-6
        wrapped(image)
    assert wrapped.memory.state_size() > 0
    assert len(wrapped.memory.names) == 12 and wrapped.memory.names[0] == "blocks.0.attn"


# -- XL over frames == one block-causal pass -------------------------------------------------------------------


@pytest.mark.parametrize("fused", FUSED)
@pytest.mark.parametrize("window", [1, 3])
def test_xl_stream_over_frames_equals_one_block_causal_pass(window: int, fused: bool) -> None:
    vit = _vit(fused, reg_tokens=1)
    n = vit.patch_embed.num_patches + vit.num_prefix_tokens
    wrapped = mp.wrap(copy.deepcopy(vit), "xl", mem_len=window * n).eval()  # holds exactly `window` frames
    frames = _frames(4)
    with torch.no_grad():
        expected = _block_causal(vit, frames, window)
        for t, frame in enumerate(frames):
            assert _max(wrapped(frame), expected[t]) <= 1e-5, f"frame {t}"
    # window 1 cannot see frame 0 from frame 3, window 3 can: the two references differ
    with torch.no_grad():
        other = _block_causal(vit, frames, 3 if window == 1 else 1)
    assert _max(other[3], expected[3]) > 1e-4


def test_class_and_register_tokens_are_written_to_memory() -> None:
    vit = _vit(reg_tokens=2)
    seen: list[Tensor] = []
    vit.blocks[0].attn.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    wrapped = mp.wrap(vit, "xl", mem_len=64).eval()
    with torch.no_grad():
        wrapped(_frames(1)[0])
    mem = wrapped.memory_state()["layers"]["blocks.0.attn"]["mem"]  # (b, 64, e), right-aligned
    x = seen[0]  # (b, 19, e): class, 2 registers, 16 patches, after norm1
    assert x.shape[1] == 19
    assert torch.equal(mem[:, -19:], x)


# -- padding via the host's attn_mask ----------------------------------------------------------------------


@pytest.mark.parametrize("fused", FUSED)
def test_keys_nobody_sees_are_padding_and_never_enter_the_memory(fused: bool) -> None:
    vit = _vit(fused)
    n = vit.patch_embed.num_patches + vit.num_prefix_tokens  # 17
    wrapped = mp.wrap(copy.deepcopy(vit), "xl", mem_len=3 * n).eval()
    frames = _frames(3)
    real = torch.ones(2, 3 * n, dtype=torch.bool)
    real[0, n + 12:2 * n] = False  # sample 0: the last 5 patches of frame 1 are padding
    real[1, n + 3:n + 5] = False  # sample 1: two patches in the middle
    own = real[:, None, None, n:2 * n].expand(2, 1, n, n)  # (b, 1, n, n): frame 1's own key mask
    with torch.no_grad():
        expected = _block_causal(vit, frames, window=2, keep=real)
        out = [wrapped(frames[0]), wrapped(frames[1], attn_mask=own), wrapped(frames[2])]
        state = wrapped.memory_state()["layers"]["blocks.1.attn"]
    for t in range(3):
        assert _max(out[t], expected[t]) <= 1e-5, f"frame {t}"
    assert state["valid"].sum(dim=1).tolist() == [3 * n - 5, 3 * n - 2]  # only real tokens were written


def test_continuous_output_is_zero_at_padded_positions(probe: str) -> None:
    vit = _vit()
    reference = copy.deepcopy(vit)
    wrapped = mp.wrap(vit, probe).eval()  # adds tanh(x R) to every attention output
    real = torch.ones(1, 17, dtype=torch.bool)
    real[0, 9:] = False
    own = real[:, None, None, :].expand(1, 1, 17, 17)
    features: dict[str, Tensor] = {}
    wrapped.model.blocks[0].attn.register_forward_hook(lambda m, a, out: features.__setitem__("with", out))
    reference.blocks[0].attn.register_forward_hook(lambda m, a, out: features.__setitem__("without", out))
    frame = _frames(1, b=1)[0]
    with torch.no_grad():
        wrapped(frame, attn_mask=own)
        reference(frame, attn_mask=own)
    diff = (features["with"] - features["without"]).abs().amax(dim=-1)[0]  # (n,)
    assert bool((diff[9:] == 0).all()) and bool((diff[:9] > 1e-4).all())
    assert bool(wrapped.memory.backends[0].valids[0].eq(real).all())


# -- what is refused ----------------------------------------------------------------------------------------


def test_incompatible_attention_is_refused_naming_the_block_and_what_is_allowed() -> None:
    vit = VisionTransformer(img_size=IMG, patch_size=PATCH, embed_dim=32, depth=2, num_heads=2, attn_layer="diff")
    with pytest.raises(TypeError, match=r"block 'blocks\.0' \(Block\) has attn of type .*DiffAttention.*allowed: "
                                        r"timm\.layers\.Attention"):
        mp.wrap(vit, "xl", mem_len=8)
    vit = _vit()
    vit.blocks[1].attn = nn.MultiheadAttention(32, 2)
    with pytest.raises(TypeError, match=r"block 'blocks\.1'.*MultiheadAttention"):
        mp.wrap(vit, "xl", mem_len=8)


def test_other_timm_families_are_refused() -> None:
    from timm.models.mlp_mixer import MlpMixer

    mixer = MlpMixer(num_classes=5, img_size=IMG, patch_size=PATCH, num_blocks=1, embed_dim=16)
    with pytest.raises(TypeError, match=r"MlpMixer; supported: timm's VisionTransformer family"):
        mp.wrap(mixer, "xl", mem_len=8)


def test_frames_of_the_wrong_size_shape_or_token_count_get_a_clear_error() -> None:
    wrapped = mp.wrap(_vit(), "xl", mem_len=17).eval()
    with pytest.raises(ValueError, match=r"x has image size \(40, 40\); this ViT takes img_size=\(32, 32\)"):
        wrapped(torch.randn(2, 3, 40, 40))
    with pytest.raises(ValueError, match=r"one frame per call.*got \(2, 4, 3, 32, 32\).*feed x\[:, t\]"):
        wrapped(torch.randn(2, 4, 3, IMG, IMG))
    with pytest.raises(ValueError, match=r"x has 1 channels; this ViT takes in_chans=3"):
        wrapped(torch.randn(2, 1, IMG, IMG))
    with pytest.raises(ValueError, match=r"'blocks\.0\.attn' got a segment of 9 tokens; this ViT's frames have 17 "
                                         r"\(num_patches=16 \+ num_prefix_tokens=1\)"):
        wrapped.model.blocks(torch.randn(2, 9, 32))
    assert wrapped.memory_state()["layers"]["blocks.0.attn"] is None  # nothing was written
    wrapped(torch.randn(2, 3, IMG, IMG))  # a right frame still works


def test_dynamic_image_size_streams_frames_of_other_sizes() -> None:
    wrapped = mp.wrap(_vit(dynamic_img_size=True), "xl", mem_len=64).eval()
    with torch.no_grad():
        wrapped(torch.randn(1, 3, IMG, IMG))
        wrapped(torch.randn(1, 3, 48, 40))  # 6×5 patches + class token
    assert int(wrapped.memory_state()["layers"]["blocks.0.attn"]["valid"].sum()) == 17 + 31


def test_gradient_checkpointing_is_refused_in_training_and_wrapping_twice_is_refused() -> None:
    vit = _vit()
    wrapped = mp.wrap(vit, "xl", mem_len=17)
    vit.set_grad_checkpointing(True)
    with pytest.raises(RuntimeError, match="gradient checkpointing"):
        wrapped.train()(torch.randn(1, 3, IMG, IMG))
    with pytest.raises(ValueError, match="already has a memory hook"):
        mp.wrap(vit, "xl", mem_len=17)
    assert wrapped.unwrap() is vit and not vit.blocks[0].attn._forward_pre_hooks


# -- the example's task -------------------------------------------------------------------------------------


def test_vision_task_puts_the_label_only_in_the_first_frame() -> None:
    from examples.vision.task import K, make_sequences, wilson

    x, y = make_sequences(64, 5, side=16, noise=0.0, seed=3)  # (T, b, 1, 16, 16), noise off
    quadrants = x[0, :, 0].reshape(64, 2, 8, 2, 8).mean(dim=(2, 4)).reshape(64, 4)  # (b, K) mean of each quadrant
    assert torch.equal(quadrants.argmax(dim=1), y) and set(y.tolist()) == set(range(K))
    assert bool((x[-1] == x[-1, :1]).all())  # the query frame is the same for every label
    assert not bool((x[1] == x[1, :1]).all())  # distractors vary
    lo, hi = wilson(50, 100)
    assert lo < 0.5 < hi and hi - lo < 0.2


@pytest.mark.parametrize("name", MEMORIES)
def test_forward_features_is_a_segment_like_a_call_of_the_model(name: str) -> None:
    """``forward_features`` (features for the user's own head) writes what a call of the model writes and
    keeps the aux loss of its own call only (before, each call added its aux losses to the last ones')."""
    through_model = _wrapped(name, _vit()).train()
    through_features = copy.deepcopy(through_model)
    for frame in _frames(3):  # frames 2 and 3 read what the earlier ones wrote
        logits = through_model(frame)  # (b, classes)
        features = through_features.model.forward_features(frame)  # (b, n, e)
        assert torch.equal(through_features.model.forward_head(features), logits)
        assert torch.equal(through_features.memory_aux_loss(), through_model.memory_aux_loss())
    assert states_equal(through_features.memory_state(), through_model.memory_state())


@pytest.mark.parametrize("name", MEMORIES)
def test_a_forward_features_call_that_fails_changes_no_memory(name: str) -> None:
    wrapped = _wrapped(name, _vit())
    frames = _frames(2)
    with torch.no_grad():
        wrapped.model.forward_features(frames[0])
        before = copy.deepcopy(wrapped.memory_state())
        handle = wrapped.model.blocks[-1].register_forward_hook(lambda *_: (_ for _ in ()).throw(RuntimeError("boom")))
        with pytest.raises(RuntimeError, match="boom"):
            wrapped.model.forward_features(frames[1])
        handle.remove()
    assert states_equal(wrapped.memory_state(), before)


@pytest.mark.parametrize("name", MEMORIES)
def test_blocks_run_one_by_one_keep_the_aux_loss_of_their_own_call(name: str) -> None:
    """With an ``attn_mask`` timm's ``forward_features`` runs the blocks one by one, so no module call
    spans them: a layer stepped again (at or below the last one stepped) starts a new call, whose aux
    losses replace the last call's instead of adding to them."""
    through_model = _wrapped(name, _vit()).train()
    one_by_one = copy.deepcopy(through_model)
    n = one_by_one.model.patch_embed.num_patches + one_by_one.model.num_prefix_tokens
    mask = torch.ones(2, 1, n, n, dtype=torch.bool)  # every key real: the same frame as without a mask
    for frame in _frames(3):
        through_model(frame, attn_mask=mask)
        one_by_one.model.forward_features(frame, attn_mask=mask)
        assert len(one_by_one.memory.aux_losses) == len(through_model.memory.aux_losses)
        torch.testing.assert_close(one_by_one.memory_aux_loss(), through_model.memory_aux_loss())
    assert states_equal(one_by_one.memory_state(), through_model.memory_state())


def test_forward_features_after_a_failed_call_of_the_model_still_writes() -> None:
    """A direct call of the base model that raised leaves no open transaction behind (its commit hook
    runs on failure too, and keeps nothing), so a later ``forward_features`` is a segment of its own."""
    wrapped = _wrapped("xl", _vit())
    clean = copy.deepcopy(wrapped)
    frame = _frames(1)[0]
    with torch.no_grad():
        handle = wrapped.model.blocks[-1].register_forward_hook(lambda *_: (_ for _ in ()).throw(RuntimeError("boom")))
        with pytest.raises(RuntimeError, match="boom"):
            wrapped.model(frame)
        handle.remove()
        assert not wrapped.memory.in_forward and not wrapped.memory.staged
        wrapped.model.forward_features(frame)
        clean.model.forward_features(frame)
    assert states_equal(wrapped.memory_state(), clean.memory_state())
