from __future__ import annotations

import torch

from tta import TTAModel


class BrightBox(torch.nn.Module):
    """Detects the bright rectangle of an image: a flip- and scale-equivariant stub."""

    def forward(self, images: list[torch.Tensor]) -> list[dict]:
        outs = []
        for image in images:
            ys, xs = torch.nonzero(image[0] > 0.5, as_tuple=True)
            box = torch.tensor([[xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]], dtype=torch.float32)
            outs.append({"boxes": box, "scores": torch.tensor([0.9]), "labels": torch.tensor([2]),
                         "masks": torch.ones(1, 1, 28, 28), "image_size": tuple(image.shape[-2:])})
        return outs


def test_views_of_one_cell_merge_into_one_detection() -> None:
    image = torch.zeros(3, 60, 80)
    image[:, 10:30, 40:52] = 1.0
    out = TTAModel(BrightBox(), scales=(1.0, 2.0), flips=True)([image])[0]
    assert len(out["crops"]) == 1 and out["labels"].tolist() == [2]
    assert torch.allclose(out["boxes"][0], torch.tensor([40.0, 10.0, 52.0, 30.0]), atol=1.0)
    x0, y0, crop = out["crops"][0]
    assert abs(x0 - 40) <= 1 and abs(y0 - 10) <= 1 and abs(int(crop.sum()) - 12 * 20) <= 40
    assert out["image_size"] == (60, 80)


def test_without_views_or_merging_it_is_the_plain_model() -> None:
    torch.manual_seed(0)
    from model import build_model

    model = build_model({"backbone": "resnet101", "weights": "none", "min_size": 64, "max_size": 64,
                         "input_scale": 0.0, "detections_per_img": 15}).eval()
    model.transform.paste_masks = False
    image = torch.rand(3, 64, 72)
    with torch.no_grad():
        plain = model([image])[0]
        tta = TTAModel(model, scales=(1.0,), flips=False, match_thresh=1.01)([image])[0]
    order = torch.argsort(plain["scores"], descending=True)
    assert torch.allclose(tta["boxes"], plain["boxes"][order]) and torch.equal(tta["labels"], plain["labels"][order])
