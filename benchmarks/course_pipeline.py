"""The course's data pipeline, the baseline the benchmark times ours against: a PNG folder,
a Dataset that globs a character's folder and decodes one PNG per image with Pillow, and a
torch DataLoader with 2 worker processes. The course's steps are in reference.py.
"""
import glob
import os

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler

import omniglot


def write_png_folder(images, folder):
    """Writes every image as a course-style PNG, black strokes on white, mode '1'.

    Args:
        images (np.ndarray): uint8, strokes = 1, shape (1623, images per character, 28, 28)
        folder (str): becomes folder/alphabetAA/characterCCCC/II.png, characters in index order
    """
    for class_idx, character in enumerate(images):
        path = os.path.join(folder, f'alphabet{class_idx // 100:02d}', f'character{class_idx:04d}')
        os.makedirs(path)
        for image_idx, image in enumerate(character):
            Image.fromarray(image == 0).save(os.path.join(path, f'{image_idx:02d}.png'))


def load_image(file_path):
    """The course's load_image: a PNG file -> float32 tensor (1, 28, 28), strokes 1.0."""
    x = np.asarray(Image.open(file_path).convert('L'), dtype=np.float32) / 255.0
    return torch.from_numpy(1.0 - x).reshape(1, omniglot.IMAGE_SIZE, omniglot.IMAGE_SIZE)


class CourseDataset(Dataset):
    """The course's OmniglotDataset: globs and decodes the PNG files of a task's classes."""

    def __init__(self, folder, num_support, num_query):
        self._character_folders = sorted(glob.glob(os.path.join(folder, '*/*/')))
        self._num_support = num_support
        self._num_query = num_query

    def __getitem__(self, class_idxs):
        images_support, images_query, labels_support, labels_query = [], [], [], []
        for label, class_idx in enumerate(class_idxs):
            file_paths = glob.glob(os.path.join(self._character_folders[class_idx], '*.png'))
            sampled = np.random.default_rng().choice(
                file_paths, size=self._num_support + self._num_query, replace=False)
            images = [load_image(file_path) for file_path in sampled]
            images_support.extend(images[:self._num_support])
            images_query.extend(images[self._num_support:])
            labels_support.extend([label] * self._num_support)
            labels_query.extend([label] * self._num_query)
        return (torch.stack(images_support), torch.tensor(labels_support),
                torch.stack(images_query), torch.tensor(labels_query))


class CourseSampler(Sampler):
    """The course's OmniglotSampler: num_way distinct classes of the split per task."""

    def __init__(self, split_idxs, num_way, num_tasks):
        super().__init__()
        self._split_idxs = split_idxs
        self._num_way = num_way
        self._num_tasks = num_tasks

    def __iter__(self):
        return (np.random.default_rng().choice(self._split_idxs, size=self._num_way,
                                               replace=False) for _ in range(self._num_tasks))

    def __len__(self):
        return self._num_tasks


def keep_list(task_batch):
    return task_batch


def course_dataloader(folder, split, batch_size, num_way, num_support, num_query, num_tasks):
    """The course's get_omniglot_dataloader: 2 workers, batches are lists of task tuples."""
    return DataLoader(CourseDataset(folder, num_support, num_query), batch_size=batch_size,
                      sampler=CourseSampler(omniglot.split_classes(split), num_way, num_tasks),
                      num_workers=2, collate_fn=keep_list, drop_last=True,
                      pin_memory=torch.cuda.is_available())
