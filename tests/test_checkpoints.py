"""Original MedSAM checkpoints (segment-anything state dicts): conversion proven against segment-anything itself;
bad checkpoint files give one clear error."""

from __future__ import annotations

import collections
from functools import partial

import numpy as np
import onnxruntime as ort
import pytest
import torch
from conftest import manifest_of, rng_image, run_cli

from medsam_rt import MedSAM
from medsam_rt.errors import ExportError
from medsam_rt_export import export_model
from medsam_rt_export.graphs import segment_anything_decode
from medsam_rt_export.sources import load_source

sam_modeling = pytest.importorskip("segment_anything.modeling")


def tiny_segment_anything() -> torch.nn.Module:
    """A tiny segment-anything ``Sam`` (decoder with SAM's 8 heads), fixed random weights."""
    m = sam_modeling
    torch.manual_seed(3)
    sam = m.Sam(
        m.ImageEncoderViT(
            depth=2,
            embed_dim=32,
            img_size=1024,
            mlp_ratio=2,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
            num_heads=2,
            patch_size=16,
            qkv_bias=True,
            use_rel_pos=True,
            global_attn_indexes=[1],
            window_size=14,
            out_chans=32,
        ),
        m.PromptEncoder(embed_dim=32, image_embedding_size=(64, 64), input_image_size=(1024, 1024), mask_in_chans=16),
        m.MaskDecoder(
            num_multimask_outputs=3,
            transformer=m.TwoWayTransformer(depth=2, embedding_dim=32, mlp_dim=64, num_heads=8),
            transformer_dim=32,
            iou_head_depth=3,
            iou_head_hidden_dim=32,
        ),
    )
    with torch.no_grad():  # make the output depend visibly on the weights (default init is near zero)
        for p in sam.parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape) * p[0].numel() ** -0.5)
    return sam.eval()


@pytest.fixture(scope="module")
def sa_model():
    return tiny_segment_anything()


@pytest.fixture(scope="module")
def pth_path(tmp_path_factory, sa_model):
    path = tmp_path_factory.mktemp("ckpt") / "medsam_tiny.pth"
    torch.save(sa_model.state_dict(), path)
    return path


@pytest.fixture(scope="module")
def pth_dir(tmp_path_factory, pth_path):
    return export_model(tmp_path_factory.mktemp("models") / "from-pth", str(pth_path))


def _sa_decode(sam, emb: torch.Tensor, boxes: np.ndarray):
    with torch.no_grad():
        return segment_anything_decode(sam.prompt_encoder, sam.mask_decoder, emb, torch.from_numpy(boxes))


def test_exported_graphs_match_segment_anything(pth_dir, sa_model):
    m = manifest_of(pth_dir)
    assert m["model"]["kind"] == "segment_anything_checkpoint" and m["preprocessing"]["recipe"] == "medsam-original"
    enc = ort.InferenceSession(str(pth_dir / "encoder.fp32.onnx"))
    dec = ort.InferenceSession(str(pth_dir / "decoder.fp32.onnx"))
    pixels = np.random.default_rng(0).random((1, 3, 1024, 1024), dtype=np.float32)
    with torch.no_grad():
        ref_emb = sa_model.image_encoder(torch.from_numpy(pixels))
    (emb,) = enc.run(None, {"pixel_values": pixels})
    np.testing.assert_allclose(emb, ref_emb.numpy(), atol=1e-3)
    for boxes in (
        np.float32([[100, 200, 600, 700]]),
        np.float32([[0, 0, 1024, 1024], [10, 5, 80, 90], [500, 40, 990, 300]]),
    ):
        ref_logits, ref_iou = _sa_decode(sa_model, ref_emb, boxes)
        logits, iou = dec.run(None, {"image_embeddings": ref_emb.numpy(), "boxes": boxes})
        assert np.abs(ref_logits.numpy()).max() > 0.5  # not a trivially small output
        np.testing.assert_allclose(logits, ref_logits.numpy(), atol=1e-3)
        np.testing.assert_allclose(iou, ref_iou.numpy(), atol=1e-3)


def test_runtime_follows_medsam_original_recipe(pth_dir, sa_model):
    """Square 1024 resize, min-max, boxes * 1024/W, 1024/H, logits bilinear 256 -> (H, W), as MedSAM_Inference.py."""
    import torch.nn.functional as F

    from medsam_rt.core.preprocess import preprocess_image, to_rgb_uint8

    model = MedSAM.load(pth_dir)
    image = rng_image((300, 700), seed=4)
    boxes = np.array([[50.0, 40, 300, 250], [400, 10, 690, 280]])
    res = model.segment(model.embed(image), boxes)
    pixels, resized = preprocess_image(to_rgb_uint8(image), model.preprocessing)
    assert resized == (1024, 1024) and pixels.min() == 0.0 and pixels.max() == 1.0
    with torch.no_grad():
        emb = sa_model.image_encoder(torch.from_numpy(pixels))
    logits, iou = _sa_decode(sa_model, emb, (boxes / np.array([700, 300, 700, 300]) * 1024).astype(np.float32))
    ref = F.interpolate(logits, size=(300, 700), mode="bilinear", align_corners=False)[:, 0].numpy()
    decided = np.abs(ref) > 1e-2
    np.testing.assert_array_equal(res.masks[decided], (ref > 0)[decided])
    np.testing.assert_allclose(res.scores, iou[:, 0].numpy(), atol=1e-3)


def test_bad_checkpoints_give_one_clear_error(tmp_path, pth_path, sa_model):
    good = torch.load(pth_path, weights_only=True)
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(pth_path.read_bytes()[:4000])
    with pytest.raises(ExportError, match="truncated.pth: cannot read it"):
        load_source(str(truncated))

    evil = tmp_path / "pickle.pth"
    torch.save({"model": good, "hook": collections.Counter(a=1), "fn": partial(print, "pwned")}, evil)
    with pytest.raises(ExportError, match="refusing to unpickle arbitrary objects"):
        load_source(str(evil))

    missing = tmp_path / "missing.pth"
    torch.save({k: v for k, v in good.items() if k != "mask_decoder.iou_token.weight"}, missing)
    with pytest.raises(ExportError, match="not a segment-anything .*iou_token|missing keys .*iou_token"):
        load_source(str(missing))

    dropped = tmp_path / "dropped.pth"
    torch.save({k: v for k, v in good.items() if k != "mask_decoder.transformer.norm_final_attn.bias"}, dropped)
    with pytest.raises(
        ExportError, match="does not fit the expected architecture: 1 missing keys .*layer_norm_final_attn"
    ):
        load_source(str(dropped))

    lite_like = tmp_path / "wrong_arch.pth"
    torch.save({"image_encoder.patch_embed.seq.0.c.weight": torch.zeros(3)}, lite_like)
    with pytest.raises(ExportError, match="not a segment-anything \\(MedSAM\\) checkpoint"):
        load_source(str(lite_like))

    not_tensors = tmp_path / "list.pth"
    torch.save([1, 2, 3], not_tensors)
    with pytest.raises(ExportError, match="not a state dict of tensors"):
        load_source(str(not_tensors))

    with pytest.raises(ExportError, match="checkpoint not found"):
        load_source(str(tmp_path / "nope.pth"))


def test_cli_export_of_a_bad_checkpoint_is_one_line(tmp_path, pth_path):
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    r = run_cli("export", "--quiet", "--model", str(bad), "--out", str(tmp_path / "out"))
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "bad.pth: cannot read it" in r.stderr
    assert not (tmp_path / "out").exists()
