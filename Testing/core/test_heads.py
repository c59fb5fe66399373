"""The atlas-based head generator and the public sources it is built from (real files from PyPI/Debian)."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from uharmony.data import heads, sources


@pytest.fixture(scope="module")
def atlas():
    return heads.build_atlas()


def _ml(mask, affine) -> float:
    return float(mask.sum()) * abs(float(np.linalg.det(affine[:3, :3]))) / 1000.0


def test_atlas_tissue_volumes_and_layering(atlas):
    t, aff = atlas
    assert t.dtype == np.uint8 and t.max() < len(heads.TISSUES)
    grey, white, csf = (_ml(t == k, aff) for k in (heads.GREY, heads.WHITE, heads.CSF))
    assert 450 < grey < 900 and 350 < white < 700, (grey, white)
    assert 100 < csf < 500, csf  # derived CSF: ventricles + subarachnoid band
    # Brain never touches air or the scalp directly: CSF, bone or marrow lie between.
    from scipy import ndimage as ndi

    brain = (t == heads.GREY) | (t == heads.WHITE)
    ring = ndi.binary_dilation(brain) & ~brain
    assert not np.isin(t[ring], [heads.AIR, heads.SCALP, heads.FAT]).any()
    # The head is one piece: no speckle of tissue in the air around it.
    _, n = ndi.label(t != heads.AIR)
    assert n == 1


def test_make_head_is_deterministic_and_varied(atlas):
    a = heads.make_head(11, atlas=atlas, spacing=3.0)
    b = heads.make_head(11, atlas=atlas, spacing=3.0)
    c = heads.make_head(12, atlas=atlas, spacing=3.0)
    assert np.array_equal(a.tissue, b.tissue) and np.allclose(a.affine, b.affine)
    assert a.tissue.shape != c.tissue.shape or not np.array_equal(a.tissue, c.tissue)
    assert abs(a.affine[0, 0]) == pytest.approx(3.0)
    labels = heads.labels_from_tissue(a.tissue)
    assert set(np.unique(labels)) <= {0, 1, 2, 3, 4}


def test_some_heads_have_lesions_with_rims(atlas):
    found_lesion = found_rim = False
    for seed in range(12):
        t = heads.make_head(seed, atlas=atlas, spacing=3.0).tissue
        found_lesion |= bool((t == heads.LESION).any())
        found_rim |= bool((t == heads.RIM).any())
        # lesions replace brain, never CSF outside it
        les = (t == heads.LESION) | (t == heads.RIM)
        if les.any():
            assert heads.labels_from_tissue(t)[les].min() == 4
    assert found_lesion and found_rim


@pytest.mark.parametrize("domain,order", [("mri-t1", ("csf", "grey", "white")), ("mri-t2", ("white", "grey", "csf")),
                                          ("mri-flair", ("csf", "white", "grey")), ("ct", ("csf", "white", "grey")),
                                          ("order-gcw", ("grey", "csf", "white")), ("order-gwc", ("grey", "white", "csf")),
                                          ("order-wcg", ("white", "csf", "grey"))])
def test_render_keeps_each_domains_contrast_order(atlas, domain, order):
    from scipy import ndimage as ndi

    for seed in (3, 4):
        head = heads.make_head(seed, atlas=atlas, spacing=3.0)
        img, info = heads.render(head, domain, seed, spacing=3.0)
        assert img.dtype == np.float32 and img.shape == head.tissue.shape and np.isfinite(img).all()
        assert info["domain"] == domain
        # medians in each tissue's interior (eroded: no partial volume)
        med = {nm: float(np.median(img[ndi.binary_erosion(head.tissue == heads.TISSUES.index(nm))]))
               for nm in order}
        assert med[order[0]] < med[order[1]] < med[order[2]], (domain, seed, med)
        if domain == "ct":
            bone = head.tissue == heads.SKULL
            assert np.median(img[bone]) > 300 and img.min() >= -1024


def test_write_dataset_is_a_valid_datalist_with_the_heads_geometry(tmp_path, atlas):
    from uharmony.data.datalist import load_datalist

    p = heads.write_dataset(tmp_path, "ct", n_train=2, n_val=1, base_seed=5, spacing=4.0, atlas=atlas)
    ds = load_datalist(p)
    assert ds.domain == "ct" and len(ds.training) == 2 and len(ds.validation) == 1
    raw = json.loads(p.read_text())
    first = raw["training"][0]
    img = nib.load(p.parent / first["image"])
    lab = nib.load(p.parent / first["label"])
    head = heads.make_head(heads.case_seed("ct", 0, 5), atlas=atlas, spacing=4.0)
    assert img.shape == lab.shape == head.tissue.shape
    assert np.allclose(img.affine, head.affine) and np.allclose(lab.affine, head.affine)
    assert np.array_equal(np.asarray(lab.dataobj), heads.labels_from_tissue(head.tissue))
    # cached: a second call renders nothing new and leaves the files as they are
    before = (p.parent / first["image"]).stat().st_mtime_ns
    heads.write_dataset(tmp_path, "ct", n_train=2, n_val=1, base_seed=5, spacing=4.0, atlas=atlas)
    assert (p.parent / first["image"]).stat().st_mtime_ns == before


def test_two_writers_of_one_dataset_do_not_collide(tmp_path, atlas, monkeypatch):
    """Benchmark workers build the same cached dataset at once. A second writer that runs between the
    first's write and its move (forced here by hooking os.replace) must not take the first's temporary
    file: both succeed and no temporary file is left."""
    import os

    kw = dict(n_train=1, n_val=0, base_seed=5, spacing=4.0, atlas=atlas)
    heads.write_dataset(tmp_path, "ct", **kw)
    real_replace, nested = os.replace, []

    def replace(src, dst):
        if str(dst).endswith("dataset.json") and not nested:
            nested.append(None)
            nested[0] = heads.write_dataset(tmp_path, "ct", **kw)  # the other worker, mid-write
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    p = heads.write_dataset(tmp_path, "ct", **kw)
    assert nested == [p] and json.loads(p.read_text())["domain"] == "ct"
    assert not [f for f in p.parent.rglob("*") if ".tmp" in f.name]


def test_sources_are_cached_and_a_missing_package_is_one_clear_error(tmp_path, monkeypatch):
    d = sources.fetch("nibabel")  # already cached by the atlas fixture's neighbours or fetched now
    assert (d / "anatomical.nii").is_file()

    def boom(*a, **k):
        raise AssertionError("fetch downloaded again although the files are cached")

    monkeypatch.setattr(sources, "_download", boom)
    assert sources.fetch("nibabel") == d
    monkeypatch.undo()
    bad = sources.Source("nope", "pypi", "uharmony-no-such-package-xyz==0.0.1", {"a": "a"}, "-", "-")
    monkeypatch.setitem(sources.SOURCES, "nope", bad)
    with pytest.raises(sources.SourceError) as e:
        sources.fetch("nope", tmp_path)
    assert "nope: could not download uharmony-no-such-package-xyz==0.0.1" in str(e.value)
    assert "\n" not in str(e.value)
    assert not (tmp_path / "nope").exists()  # nothing half-written


def test_real_references_come_from_the_held_out_sources():
    from uharmony.bench.real import _dice, itk_reference, mni_reference

    _, ref = mni_reference()
    assert ref.shape == (197, 233, 189)
    gm, wm = (ref == 2).sum() / 1000, (ref == 3).sum() / 1000  # mL at 1 mm
    assert 800 < gm < 1300 and 450 < wm < 800  # MNI space is larger than a native brain
    _, ref, mask = itk_reference()
    assert ref.shape == mask.shape == (128, 128, 62)
    assert not ref[~mask].any() and set(np.unique(ref[mask])) <= {0, 1, 2, 3}
    d = _dice(ref, ref, mask)
    assert d == {"cerebrospinal fluid": 1.0, "grey matter": 1.0, "white matter": 1.0}
    shifted = np.roll(ref, 2, axis=0)
    assert _dice(shifted, ref, mask)["white matter"] < 0.9


def test_gate_only_variants_leave_the_training_heads_alone_and_reach_flatter_t1(atlas):
    from scipy import ndimage as ndi

    seen_low = False
    for seed in range(8):
        head = heads.make_head(seed, atlas=atlas, spacing=4.0)
        plain, info = heads.render(head, "mri-t1", seed, spacing=4.0)
        assert "low contrast" not in info["variant"]  # the segmentation stages' heads never get it
        gate_img, gate_info = heads.render(head, "mri-t1", seed, spacing=4.0, for_gate=True)
        if "low contrast" not in gate_info["variant"]:
            continue
        seen_low = True
        med = {k: float(np.median(gate_img[ndi.binary_erosion(head.tissue == k)]))
               for k in (heads.CSF, heads.GREY, heads.WHITE)}
        csf, grey = med[heads.CSF] / med[heads.WHITE], med[heads.GREY] / med[heads.WHITE]
        assert csf < grey < 1.0, med  # still T1's order, but CSF/WM as high as the MNI template's 0.47
        assert 0.2 < csf < 0.75 and 0.55 < grey, (csf, grey)
    assert seen_low


def test_novel_order_styles_are_orders_no_bench_domain_has_rendered_on_given_anatomy(tmp_path, atlas):
    trained = {heads.DOMAINS[d]["order"] for d in (*heads.BENCH_TRAIN_DOMAINS, heads.BENCH_UNSEEN_DOMAIN)}
    novel = {heads.NOVEL_ORDER_STYLES[d]["order"] for d in heads.BENCH_NOVEL_STYLES}
    assert len(novel) == 3 and not novel & trained and len(novel | trained) == 6  # every order of three tissues
    assert not set(heads.BENCH_NOVEL_STYLES) & set(heads.DOMAINS)  # styles to score, never a training domain
    seeds = [heads.case_seed("mri-flair", i, 5) for i in (0, 3)]
    p = heads.write_dataset(tmp_path, "order-gcw", n_train=1, n_val=1, spacing=4.0, atlas=atlas, seeds=seeds)
    raw = json.loads(p.read_text())
    assert raw["domain"] == "order-gcw" and len(raw["training"]) == len(raw["validation"]) == 1
    lab = np.asarray(nib.load(p.parent / raw["validation"][0]["label"]).dataobj)
    flair_head = heads.make_head(seeds[1], atlas=atlas, spacing=4.0)  # the FLAIR head's anatomy, in another contrast
    assert np.array_equal(lab, heads.labels_from_tissue(flair_head.tissue))
    with pytest.raises(ValueError, match="2 anatomy seeds for 3 heads"):
        heads.write_dataset(tmp_path, "order-gcw", n_train=1, n_val=2, spacing=4.0, atlas=atlas, seeds=seeds)
