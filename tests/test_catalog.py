import pytest

from clawrouter import catalog
from clawrouter.errors import InvalidRequest, ModelNotFound


@pytest.mark.parametrize("name, model_id", [
    ("nano-banana", "google/nano-banana"), ("banana", "google/nano-banana"),
    ("Banana-Pro", "google/nano-banana-pro"), ("nano-banana-pro", "google/nano-banana-pro"),
    ("nano-banana-2", "google/nano-banana-2"), ("banana-2", "google/nano-banana-2"),
    ("gpt-image", "openai/gpt-image-1"), ("GPT-IMAGE-1", "openai/gpt-image-1"),
    ("gpt-image-2", "openai/gpt-image-2"), ("seedream", "bytedance/seedream-5-pro"),
    ("grok-imagine", "xai/grok-imagine-image"), ("grok-imagine-pro", "xai/grok-imagine-image-pro"),
    ("cogview", "zai/cogview-4"), ("cogview-4", "zai/cogview-4"), (" zai/cogview-4 ", "zai/cogview-4"),
    ("seedream-5-pro", "bytedance/seedream-5-pro"), ("dall-e-3", "openai/gpt-image-2"),
    ("dalle", "openai/gpt-image-2"), ("dall-e", "openai/gpt-image-2"),
])
def test_aliases_bare_ids_and_renames(name, model_id):
    assert catalog.resolve(name).model.id == model_id


def test_flux_is_dropped_with_advice():
    with pytest.raises(InvalidRequest, match="dropped.*nano-banana") as err:
        catalog.resolve("flux")
    assert err.value.param == "model" and err.value.status == 400


def test_unknown_model_is_404_listing_models():
    with pytest.raises(ModelNotFound, match="google/nano-banana") as err:
        catalog.resolve("dall-e-2")
    assert err.value.status == 404 and err.value.code == "model_not_found"


def test_renamed_dalle_sizes_map_to_the_nearest_and_others_are_listed():
    resolved = catalog.resolve("dall-e-3")
    assert resolved.size("1792x1024") == "1536x1024"
    with pytest.raises(InvalidRequest, match="Allowed sizes: 1024x1024, 1536x1024, 1024x1536"):
        resolved.size("256x256")


def test_estimates_match_blockrun_quotes():
    # cogview-4 was quoted $0.016750 on 2026-09-13 (0.015 × 1.05 + 0.001 fee).
    assert catalog.estimate_micro(catalog.BY_ID["zai/cogview-4"], "1024x1024", 1) == 16_750
    assert catalog.estimate_micro(catalog.BY_ID["google/nano-banana"], "1024x1024", 2) == 106_000


def test_table_is_consistent():
    names = set()
    for model in catalog.MODELS:
        assert model.prices and all(p > 0 for p in model.prices.values())
        assert not model.mask or model.edits
        assert model.edits == (model.max_images > 0)
        for alias in model.aliases:
            assert alias not in names
            names.add(alias)
    for renamed in catalog.RENAMED.values():
        assert renamed.target in catalog.BY_ID
        assert set(renamed.sizes.values()) <= set(catalog.BY_ID[renamed.target].sizes)


def test_format_usd():
    assert catalog.format_usd(52_500) == "$0.0525"
    assert catalog.format_usd(1_000_000) == "$1.00"
    assert catalog.format_usd(16_750) == "$0.01675"


def test_readme_model_table_matches_the_catalog():
    from pathlib import Path

    readme = (Path(__file__).parent.parent / "README.md").read_text()
    for model in catalog.MODELS:
        row = next(line for line in readme.splitlines() if line.startswith(f"| `{model.id}`"))
        for alias in model.aliases:
            assert f"`{alias}`" in row, (model.id, alias)
        for size, price in model.prices.items():
            assert size in row and f"${round(price * catalog.BASE_MARKUP, 6):g}" in row
