"""Omniglot: download, check, resize and cache the images once; then sample tasks in memory.

The whole data set lives in one uint8 tensor of shape (1623, 20, 28, 28) (strokes = 1), on the
training device, and a task is one indexing operation: no PNG decoding, no file globbing.
"""
import functools
import io
import os
import zipfile
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import sampling
import util
from util import UserError

NUM_TRAIN_CLASSES = 1100
NUM_VAL_CLASSES = 100
NUM_TEST_CLASSES = 423
NUM_SAMPLES_PER_CLASS = 20
NUM_CLASSES = NUM_TRAIN_CLASSES + NUM_VAL_CLASSES + NUM_TEST_CLASSES
NUM_ALPHABETS = 50
IMAGE_SIZE = 28
CACHE_SHAPE = (NUM_CLASSES, NUM_SAMPLES_PER_CLASS, IMAGE_SIZE, IMAGE_SIZE)

CACHE_NAME = 'omniglot28.npy'
RESIZED_DIR = 'omniglot_resized'  # the course's pre-resized folder, used if a user has it
OFFICIAL_URL = 'https://github.com/brendenlake/omniglot/raw/master/python'
# The official archives' md5 sums, as published with the data set (torchvision checks the same).
OFFICIAL_MD5 = {'images_background.zip': '68d2efa1b9178cc56df9314c21c6e718',
                'images_evaluation.zip': '6b91aef0f799c5bb55b94e3f2daec811'}
SPLITS = sampling.SPLIT_NUMBERS  # train, val, test: their order in the shuffled characters
MIRROR_FIX = 'set OMNIGLOT_MIRROR to a folder or file:// URL holding the two official zips'


# ----- getting the data -----
def data_dir():
    """Where the zips and the cache live: $OMNIGLOT_DIR, else data/omniglot (read at call time)."""
    return os.environ.get('OMNIGLOT_DIR', os.path.join('data', 'omniglot'))


def fetch_zips(data_dir):
    """Returns the paths of the two zips in data_dir, downloading the missing ones."""
    base, official = util.source_url('OMNIGLOT_MIRROR', OFFICIAL_URL)
    paths = []
    for name, md5 in OFFICIAL_MD5.items():
        path = Path(data_dir) / name
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            # A mirror may repack the archives; its content is checked by read_zip instead.
            util.download(f'{base}/{name}', path, md5 if official else None, MIRROR_FIX)
        paths.append(path)
    return paths


def to_strokes(image):
    """A PIL image of black strokes on white -> uint8 array of shape (28, 28), strokes = 1."""
    if image.size != (IMAGE_SIZE, IMAGE_SIZE):
        image = image.resize((IMAGE_SIZE, IMAGE_SIZE))  # mode '1': nearest neighbour, as the course
    return (np.asarray(image.convert('L')) < 128).astype(np.uint8)


def read_zip(path):
    """Decodes one official zip into {'alphabet/character': [20 arrays (28, 28)]}."""
    characters = defaultdict(list)
    try:
        with zipfile.ZipFile(path) as archive:
            for name in sorted(archive.namelist()):
                parts = name.split('/')
                if not name.endswith('.png') or len(parts) != 4:
                    continue
                with Image.open(io.BytesIO(archive.read(name))) as image:
                    characters['/'.join(parts[1:3])].append(to_strokes(image))
    except (zipfile.BadZipFile, OSError, EOFError) as error:
        raise UserError(f'{path} is corrupt or truncated ({error}); delete it and run again '
                        'to download it anew') from None
    return characters


def read_resized_folder(folder):
    """Reads the course's omniglot_resized/<alphabet>/<character>/*.png folder."""
    characters = {}
    for character in sorted(Path(folder).glob('*/*')):
        if character.is_dir():
            characters[f'{character.parent.name}/{character.name}'] = [
                to_strokes(Image.open(png)) for png in sorted(character.glob('*.png'))]
    return characters


def check_characters(characters, source):
    """Checks 50 alphabets, 1623 characters, 20 images each; a clear error otherwise."""
    alphabets = {name.split('/')[0] for name in characters}
    fix = f'{source} is incomplete or not Omniglot; delete it and run again to fetch it anew'
    if len(alphabets) != NUM_ALPHABETS:
        raise UserError(f'found {len(alphabets)} alphabets, expected {NUM_ALPHABETS}: {fix}')
    if len(characters) != NUM_CLASSES:
        raise UserError(f'found {len(characters)} characters, expected {NUM_CLASSES}: {fix}')
    for name, images in characters.items():
        if len(images) != NUM_SAMPLES_PER_CLASS:
            raise UserError(f'character {name} has {len(images)} images, '
                            f'expected {NUM_SAMPLES_PER_CLASS}: {fix}')


def load_cache(cache):
    """The uint8 images (1623, 20, 28, 28) cached in the file cache, or None, said in one line,
    when it is cut short or not that array: prepare then rebuilds it."""
    try:
        images = np.load(cache, allow_pickle=False)  # an object array would run code
    except (ValueError, OSError, EOFError):  # a cut-short .npy or an object array: ValueError
        images = None
    if images is not None and images.shape == CACHE_SHAPE and images.dtype == np.uint8:
        return images
    print(f'{cache} is cut short or damaged; rebuilding it from the zips.')
    return None


def prepare(folder=None):
    """Returns all images as a uint8 array (1623, 20, 28, 28), characters sorted by path.

    Loads the cache in folder (default: data_dir()) if present and whole; otherwise reads the course's
    omniglot_resized folder if the user has one, else the two zips (downloading them), then
    writes the cache atomically.
    """
    folder = folder or data_dir()
    cache = Path(folder) / CACHE_NAME
    images = load_cache(cache) if cache.exists() else None
    if images is not None:
        return images
    if Path(RESIZED_DIR).is_dir():
        characters, source = read_resized_folder(RESIZED_DIR), RESIZED_DIR
    else:
        paths = fetch_zips(folder)
        characters, source = {}, ' and '.join(str(path) for path in paths)
        for path in paths:
            characters.update(read_zip(path))
    check_characters(characters, source)
    images = np.stack([np.stack(characters[name]) for name in sorted(characters)])
    with util.atomic_file(cache) as file:
        np.save(file, images)
    return images


def split_classes(split):
    """Indices (into the sorted characters) of a split's classes, shuffled with seed 0."""
    if split not in SPLITS:
        raise UserError(f"unknown split '{split}'; use one of {', '.join(SPLITS)}")
    order = np.arange(NUM_CLASSES)
    np.random.default_rng(0).shuffle(order)
    bounds = np.cumsum([0, NUM_TRAIN_CLASSES, NUM_VAL_CLASSES, NUM_TEST_CLASSES])
    return order[bounds[SPLITS[split]]:bounds[SPLITS[split] + 1]]


# ----- sampling tasks (sampling.py: the contract) -----
class OmniglotDataset(torch.utils.data.Dataset):
    """Omniglot tasks, indexed by a tuple of class indices as in the assignment.

    Args:
        num_support (int): number of support examples per class
        num_query (int): number of query examples per class
        images (torch.Tensor): uint8 images of all classes, shape (1623, 20, 28, 28);
            default: the prepared data set
        generator (torch.Generator): draws which images of each class a task uses;
            default: one seeded from torch's global generator
    """

    def __init__(self, num_support, num_query, images=None, generator=None):
        super().__init__()
        self._num_support = num_support
        self._num_query = num_query
        images = torch.from_numpy(prepare()) if images is None else images
        self._images = images.flatten(0, 1)  # (1623 * 20, 28, 28): one row per image
        self._generator = generator or sampling.generator_from_torch_seed()

    def make_tasks(self, class_idxs):
        """Builds one task per row of class_idxs: one gather for the support sets, one for the
        query sets, each straight into its final layout.

        Args:
            class_idxs (torch.Tensor): int64 class indices, shape (num_tasks, num_way)

        Returns:
            sampling.TaskBatch of num_tasks tasks (images_support, labels_support,
            images_query, labels_query), shapes (num_tasks, num_way * num_support, 1, 28, 28),
            (num_tasks, num_way * num_support), (num_tasks, num_way * num_query, 1, 28, 28),
            (num_tasks, num_way * num_query); class-major order.
        """
        num_tasks, num_way = class_idxs.shape
        num_images = self._num_support + self._num_query
        scores = torch.rand(num_tasks, num_way, NUM_SAMPLES_PER_CLASS, generator=self._generator)
        image_idxs = scores.argsort(dim=-1)[..., :num_images]  # distinct images per class
        rows = util.host_to_device(class_idxs[..., None] * NUM_SAMPLES_PER_CLASS + image_idxs,
                                   self._images.device)
        support = self._gather(rows[..., :self._num_support])
        query = self._gather(rows[..., self._num_support:])
        labels = torch.arange(num_way, device=self._images.device)
        labels_support = labels.repeat_interleave(self._num_support).expand(num_tasks, -1)
        labels_query = labels.repeat_interleave(self._num_query).expand(num_tasks, -1)
        return sampling.TaskBatch(support, labels_support, query, labels_query)

    def _gather(self, rows):
        """Images of the given rows in torch's default dtype (float32 unless changed), 1 channel.

        Args:
            rows (torch.Tensor): int64 row indices into the flat images,
                shape (num_tasks, num_way, shots)

        Returns:
            images, shape (num_tasks, num_way * shots, 1, 28, 28)
        """
        images = self._images.index_select(0, rows.flatten()).to(torch.get_default_dtype())
        return images.view(rows.shape[0], -1, 1, IMAGE_SIZE, IMAGE_SIZE)

    def __getitem__(self, class_idxs):
        """The assignment's interface to make_tasks(): class_idxs (num_way ints) -> one task
        tuple."""
        return self.make_tasks(torch.as_tensor(np.asarray(class_idxs)).view(1, -1))[0]


class OmniglotSampler(torch.utils.data.Sampler):
    """Draws the classes of tasks: num_way distinct classes of one split, uniformly.

    Args:
        split_idxs (sequence of int): the split's class indices (an array, or a range as in
            the assignment)
        num_way (int): classes per task
        num_tasks (int): tasks per epoch, when iterated
        generator (torch.Generator): the source of randomness; default: one seeded from
            torch's global generator
    """

    def __init__(self, split_idxs, num_way, num_tasks, generator=None):
        super().__init__()
        self._split_idxs = torch.as_tensor(np.asarray(split_idxs))
        self._num_way = num_way
        self._num_tasks = num_tasks
        self._generator = generator or sampling.generator_from_torch_seed()

    def sample(self, num_tasks):
        """Class indices of num_tasks tasks, shape (num_tasks, num_way)."""
        scores = torch.rand(num_tasks, len(self._split_idxs), generator=self._generator)
        # The num_way smallest scores, in order: argsort's first num_way, without the full sort.
        return self._split_idxs[scores.topk(self._num_way, largest=False).indices]

    def __iter__(self):
        """The assignment's interface to sample(): num_tasks tuples of num_way class indices."""
        return (tuple(row.tolist()) for row in self.sample(self._num_tasks))

    def __len__(self):
        return self._num_tasks


class ClassifierImages:
    """Images of a split's characters for pre-training an ordinary classifier (maml_transfer.py):
    a batch is one task of all the split's classes, (images, labels), and no query set.

    Args:
        images (torch.Tensor): uint8 images of all classes, shape (1623, 20, 28, 28)
        split_idxs (np.ndarray): the split's class indices; class split_idxs[c] has label c
    """

    def __init__(self, images, split_idxs):
        classes = torch.as_tensor(split_idxs, device=images.device)
        self._images = images.index_select(0, classes).flatten(0, 1)  # (classes * 20, 28, 28)

    def make_tasks(self, image_idxs):
        """image_idxs (int64, shape (batch,)) into the split's images -> [(images (batch, 1, 28,
        28) in torch's default dtype, labels (batch,) int64)]."""
        rows = util.host_to_device(image_idxs, self._images.device)
        return [(self._images.index_select(0, rows).to(torch.get_default_dtype()).unsqueeze(1),
                 rows // NUM_SAMPLES_PER_CLASS)]


def get_image_dataloader(split, batch_size, num_images_per_epoch, seed=0, device='cpu'):
    """A TaskLoader of num_images_per_epoch // batch_size batches of a split's images for
    pre-training a classifier, each [(images (batch_size, 1, 28, 28), labels (batch_size,))]."""
    split_idxs = split_classes(split)
    generator = sampling.split_generator(seed, split)
    dataset = ClassifierImages(images_on(str(device)), split_idxs)
    sampler = sampling.UniformSampler(len(split_idxs) * NUM_SAMPLES_PER_CLASS, generator)
    return sampling.TaskLoader(dataset, sampler, batch_size, num_images_per_epoch // batch_size,
                               generator)


def check_task_flags(num_way, num_support, num_query):
    """Raises UserError for a task shape no split can provide; needs no data, so OmniglotTasks
    calls it before any is loaded or downloaded."""
    for name, value in [('num_way', num_way), ('num_support', num_support),
                        ('num_query', num_query)]:
        if value < 1:
            raise UserError(f'--{name} must be at least 1, got {value}')
    if num_support + num_query > NUM_SAMPLES_PER_CLASS:
        raise UserError(f'num_support + num_query = {num_support + num_query}, but each class '
                        f'has only {NUM_SAMPLES_PER_CLASS} images; lower --num_support or --num_query')


def check_task_shape(num_way, num_support, num_query, num_classes, split):
    """Raises UserError for a task shape the split's num_classes cannot provide."""
    check_task_flags(num_way, num_support, num_query)
    if num_way > num_classes:
        raise UserError(f'--num_way {num_way} is more than the {num_classes} classes of the '
                        f"'{split}' split; lower --num_way")


@functools.cache
def images_on(device):
    """All images as a uint8 tensor (1623, 20, 28, 28) on device, read from the cache once per
    process (on the CPU) and copied to each device once: every loader shares it."""
    if torch.device(device).type != 'cpu':
        return images_on('cpu').to(device)
    return torch.from_numpy(prepare())


def get_omniglot_dataloader(split, batch_size, num_way, num_support, num_query,
                            num_tasks_per_epoch, num_workers=2, seed=0, device='cpu'):
    """Returns a TaskLoader of num_tasks_per_epoch // batch_size batches of split's tasks.

    num_workers is accepted for the assignment's interface; sampling is in-memory indexing,
    which is faster in the main process than any worker pool.
    """
    del num_workers
    split_idxs = split_classes(split)
    check_task_shape(num_way, num_support, num_query, len(split_idxs), split)
    if batch_size < 1:
        raise UserError(f'--batch_size must be at least 1, got {batch_size}')
    generator = sampling.split_generator(seed, split)
    dataset = OmniglotDataset(num_support, num_query, images_on(str(device)), generator)
    sampler = OmniglotSampler(split_idxs, num_way, num_tasks_per_epoch, generator)
    return sampling.TaskLoader(dataset, sampler, batch_size, num_tasks_per_epoch // batch_size,
                               generator)


class OmniglotTasks:
    """Omniglot as the one main body (training.main) samples it: a task source (sampling.py).

    Args:
        num_way, num_support, num_query (int): the task shape
        seed (int): seeds the task stream of every split
    """

    def __init__(self, num_way, num_support, num_query, seed=0):
        check_task_flags(num_way, num_support, num_query)
        self._shape = (num_way, num_support, num_query)
        self._seed = seed

    def prepare(self):
        images_on('cpu')  # fetches and caches the data set; the loaders reuse what it read
        return f'Omniglot is ready in {data_dir()}.'

    def loader(self, split, batch_size, num_tasks, device):
        return get_omniglot_dataloader(split, batch_size, *self._shape, num_tasks,
                                       seed=self._seed, device=device)
