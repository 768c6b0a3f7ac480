"""TDC Metabolism: 8 CYP data sets as 1024-bit Morgan fingerprints; binary tasks sampled in memory.

The data is the pickle the data set's authors distribute, `<datadir>/metabolism_data_new.pkl`:
{name: {'feature': (n, 1024) array, 'label': (n,) 0/1 array}}. Without it we build the same dict
from TDC's raw files (columns Drug_ID, Drug = SMILES, Y = 0/1), downloading them when absent,
and cache it under that name. The pickle is read by a restricted unpickler (DataUnpickler), and
TDC's files are checked against pinned sha256 digests of their rows (TDC_SHA256). Each data
set then lives in one float32 tensor on the training device, and a task is a few indexing
operations.
"""
import codecs
import csv
import hashlib
import os
import pickle
import time
from pathlib import Path

import numpy as np
import torch
from rdkit import Chem, rdBase
from rdkit.Chem import rdFingerprintGenerator
from tqdm import tqdm

import sampling
import util
from util import UserError, check_positive

TRAIN_SETS = ('CYP1A2_Veith', 'CYP3A4_Veith', 'CYP2D6_Veith', 'CYP2C9_Substrate_CarbonMangels',
              'CYP2D6_Substrate_CarbonMangels')
# The original used the same three data sets for meta-validation and meta-test.
VAL_SETS = ('CYP3A4_Substrate_CarbonMangels', 'CYP2C19_Veith', 'CYP2C9_Veith')
TEST_SETS = VAL_SETS
ALL_SETS = TRAIN_SETS + VAL_SETS
SPLIT_SETS = {'train': TRAIN_SETS, 'val': VAL_SETS, 'test': TEST_SETS}

NUM_WAY = 2  # every data set is binary: class 0 = label 0, class 1 = label 1
NUM_BITS = 1024
MORGAN_RADIUS = 2
CACHE_NAME = 'metabolism_data_new.pkl'  # the authors' file name, for the assignment's bits
# --fingerprint: the 1024 features of a molecule. The assignment's are Morgan bits; counts read
# higher on the held-out data sets before training, about the same after (README, Data).
FINGERPRINTS = ('bits', 'counts', 'fcfp_counts')
MAX_COUNT = 255  # counts are stored as uint8; the largest in TDC's files is 95
COLUMNS = ('Drug_ID', 'Drug', 'Y')
MIRROR_VARIABLE = 'TDC_MIRROR'
OFFICIAL_URL = 'https://dataverse.harvard.edu/api/access/datafile'
# TDC's Harvard Dataverse file ids (from TDC's metadata); these files are TSV.
DATAVERSE_IDS = {'CYP1A2_Veith': 4259573, 'CYP2C19_Veith': 4259576, 'CYP2C9_Veith': 4259577,
                 'CYP2D6_Veith': 4259580, 'CYP3A4_Veith': 4259582,
                 'CYP2C9_Substrate_CarbonMangels': 4259584,
                 'CYP2D6_Substrate_CarbonMangels': 4259578,
                 'CYP3A4_Substrate_CarbonMangels': 4259581}
NUM_EXAMPLES_SHOWN = 3
# sha256 of each TDC file's sorted (Drug, Y) rows (rows_sha256): TDC publishes no checksums, and
# the content, unlike the bytes, is the same whatever the line endings or the row order.
TDC_SHA256 = {
    'CYP1A2_Veith':
        '19edf4c16da5677bd521b3ce3b34f99e8d5cec3c6bd0e11e6f1d0954e47058fa',
    'CYP3A4_Veith':
        '143d02c2f67a2f0d4b0763bc04a2a1e610228a95b6d18aa7c53387caea592602',
    'CYP2D6_Veith':
        '6fa95a05c23361cc91d88da64f86bd195017be0d79b6cd547f995a46e3fcb2a1',
    'CYP2C9_Substrate_CarbonMangels':
        '5215443727b319d0326d70b03155c058624834e5c6d010bcda6fde09f026afcd',
    'CYP2D6_Substrate_CarbonMangels':
        'c12c0b7f557c88040cc2026c08ce06250e78c0a2742543b7b57e5ce2e582e8fe',
    'CYP3A4_Substrate_CarbonMangels':
        '661b3d72cf5c5868708fe9bb24b9f48d3dd53699f73a01f5ed0184b1f9c43da9',
    'CYP2C19_Veith':
        '997fdf50251fba7787539f117513808c4de9ade41db9d75a323d7396db98943e',
    'CYP2C9_Veith':
        'bf270690ac55eb1458d5fdf2a4112b0b69403ac1441a67a6c3bb205f3a07e1e1',
}
ACCEPT_VARIABLE = 'TDC_ACCEPT_SHA256'  # comma-separated digests of rows accepted knowingly


# ----- getting the raw files -----
def find_table(datadir, name):
    """Path of data set name's file in datadir (.tab, else .csv), or None."""
    for suffix in ('.tab', '.csv'):
        path = Path(datadir) / (name.lower() + suffix)
        if path.exists():
            return path
    return None


def fetch_tables(datadir):
    """{name: path} of the 8 raw files in datadir, downloading the missing ones into it."""
    base, official = util.source_url(MIRROR_VARIABLE, OFFICIAL_URL)
    missing = [name for name in ALL_SETS if find_table(datadir, name) is None]
    if missing:
        Path(datadir).mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(missing):
        path = Path(datadir) / (name.lower() + '.tab')
        url = f'{base}/{DATAVERSE_IDS[name]}' if official else f'{base}/{path.name}'
        fix = (f'set {MIRROR_VARIABLE} to a folder or file:// URL holding the TDC files of '
               f"{', '.join(missing[i:])} (named like {path.name}), or put them in {datadir}")
        util.download(url, path, fix=fix)
        check_sha256(name, path, url)
    return {name: find_table(datadir, name) for name in ALL_SETS}


def rows_sha256(smiles, labels):
    """sha256 (hex) of a TDC file's rows, sorted, each written as 'Drug<TAB>Y<LF>'.

    Args:
        smiles (list of str): n SMILES strings
        labels (np.ndarray): int64 0/1 labels, shape (n,)
    """
    lines = ''.join(f'{text}\t{label}\n' for text, label in sorted(zip(smiles, labels.tolist())))
    return hashlib.sha256(lines.encode()).hexdigest()


def check_sha256(name, path, url=None):
    """Raises UserError unless the rows of path, data set name's file, digest to TDC_SHA256[name]
    or to a digest listed in $TDC_ACCEPT_SHA256.

    Args:
        name (str): the data set
        path (Path): its file
        url (str): where the file was just downloaded from (it is then deleted), or None
    """
    digest, expected = rows_sha256(*read_table(path)), TDC_SHA256[name]
    if digest == expected or digest in os.environ.get(ACCEPT_VARIABLE, '').split(','):
        return
    if url is not None:
        path.unlink()
    fix = ('delete it to download it again' if url is None
           else f'check the source (${MIRROR_VARIABLE}, else TDC itself)')
    raise UserError(f"{url or path} has rows of sha256 {digest}, expected {expected} (TDC's "
                    f'{name}): {fix}, or set {ACCEPT_VARIABLE}={digest} to accept these rows '
                    'knowingly')


def read_table(path):
    """Reads one TDC file: (SMILES strings, int64 labels of shape (n,)), every label 0 or 1."""
    fix = f'{path} is not a TDC data set file; delete it and run again to download it anew'
    with open(path, newline='', encoding='utf-8') as file:
        reader = csv.DictReader(file, delimiter='\t' if path.suffix == '.tab' else ',')
        if not set(COLUMNS) <= set(reader.fieldnames or ()):
            raise UserError(f"{path} has columns {reader.fieldnames}, expected "
                            f"{', '.join(COLUMNS)}: {fix}")
        smiles, labels = [], []
        for row in reader:
            smiles.append(row['Drug'] or '')  # a missing field reads as None
            labels.append(parse_label(row['Y'], path, reader.line_num, fix))
    return smiles, np.array(labels, dtype=np.int64)


def parse_label(text, path, line, fix):
    """The label written as text ('1', '0.0', ...) as 0 or 1; anything else is a UserError."""
    try:
        value = float(text)
    except (TypeError, ValueError):
        value = None  # a missing field reads as None
    if value not in (0.0, 1.0):
        raise UserError(f'{path} line {line} has label Y = {text!r}, expected 0 or 1: {fix}')
    return int(value)


# ----- features -----
def fingerprints(smiles, name='molecules', kind='bits'):
    """Morgan fingerprints (radius 2, folded to 1024) of SMILES strings; unparsable or empty
    ones are skipped and reported.

    Args:
        smiles (list of str): n SMILES strings
        name (str): what they are, for the report of unparsable ones
        kind (str): 'bits' (ECFP4, the assignment's), 'counts' (ECFP4 counts) or 'fcfp_counts'
            (counts of the pharmacophoric-feature variant, FCFP4)

    Returns:
        features (np.ndarray): uint8 bits or counts (at most MAX_COUNT), shape (n_parsed, 1024)
        kept (np.ndarray): int64 indices into smiles of the parsed ones, shape (n_parsed,)
    """
    invariants = (rdFingerprintGenerator.GetMorganFeatureAtomInvGen() if kind == 'fcfp_counts'
                  else None)
    generator = rdFingerprintGenerator.GetMorganGenerator(
        radius=MORGAN_RADIUS, fpSize=NUM_BITS, atomInvariantsGenerator=invariants)
    fingerprint = (generator.GetFingerprintAsNumPy if kind == 'bits'
                   else generator.GetCountFingerprintAsNumPy)
    features = np.zeros((len(smiles), NUM_BITS), dtype=np.uint8)
    kept = []
    with rdBase.BlockLogs():  # RDKit would log every parse error; we report them once, below
        for i, text in enumerate(tqdm(smiles, desc=name, unit='mol', leave=False)):
            molecule = Chem.MolFromSmiles(text)
            if molecule is not None and molecule.GetNumAtoms() > 0:  # '' parses to no atoms
                features[len(kept)] = np.minimum(fingerprint(molecule), MAX_COUNT)
                kept.append(i)
    report_unparsed(smiles, kept, name)
    return features[:len(kept)], np.array(kept, dtype=np.int64)


def report_unparsed(smiles, kept, name):
    """Prints how many SMILES RDKit could not parse, with the first few."""
    failed = sorted(set(range(len(smiles))) - set(kept))
    if failed:
        examples = ', '.join(f'row {i + 1}: {smiles[i]!r}' for i in failed[:NUM_EXAMPLES_SHOWN])
        print(f'{name}: RDKit could not parse {len(failed)} of {len(smiles)} SMILES; '
              f'skipped them ({examples})')


def build(tables, kind='bits'):
    """{name: {'feature': uint8 (n, 1024), 'label': int64 (n,)}} from {name: raw file path},
    with fingerprints of the given kind.

    Duplicate rows are kept, as TDC keeps them. uint8 keeps the cache 4x smaller than float32.
    """
    data = {}
    for name, path in tables.items():
        smiles, labels = read_table(path)
        features, kept = fingerprints(smiles, name, kind)
        data[name] = {'feature': features, 'label': labels[kept]}
    return data


# ----- the cached dict -----
def cache_name(kind):
    """The pickle of a fingerprint kind: the authors' name for the assignment's bits."""
    return CACHE_NAME if kind == 'bits' else f'metabolism_data_{kind}.pkl'


def load_metabolism(datadir, fingerprint='bits'):
    """{name: {'feature': float32 (n, 1024), 'label': int64 (n,) of 0/1}} for the 8 data sets.

    Loads datadir/cache_name(fingerprint) if present (for bits, the authors' pickle or our
    cache); otherwise builds it from the raw TDC files (downloading the missing ones) and writes
    it atomically.
    """
    cache = Path(datadir) / cache_name(fingerprint)
    if cache.exists():
        return checked(read_pickle(cache), cache)
    tables = fetch_tables(datadir)
    for name, path in tables.items():
        check_sha256(name, path)
    start = time.perf_counter()
    data = build(tables, fingerprint)
    num_molecules = sum(len(entry['label']) for entry in data.values())
    print(f'Built Morgan fingerprints of {num_molecules} molecules ({fingerprint}) in '
          f'{time.perf_counter() - start:.1f} s.')
    try:
        write_pickle(data, cache)
        print(f'Cached them in {cache}.')
    except OSError as error:  # e.g. a read-only folder of TDC files: still usable, just slower
        print(f'Could not cache them in {cache} ({error}); every start will build them again '
              'unless --datadir is writable.')
    return checked(data, cache)


class DataUnpickler(pickle.Unpickler):
    """Unpickles only what the metabolism pickle holds: dicts, strings, numbers and numpy
    arrays, dtypes and scalars. Any other global (a function that a payload would call) is a
    UserError naming it, raised as the unpickler meets it, before anything is called.

    Args:
        file: the pickle, open for reading in binary mode
        path (Path): its path, for the error
    """

    def __init__(self, file, path):
        super().__init__(file)
        self._path = path

    def find_class(self, module, name):
        if (module, name) not in ALLOWED_GLOBALS:
            raise UserError(f'{self._path} asks for {module}.{name}, which the metabolism pickle '
                            'never holds; refused without running it: delete the file (it may '
                            'run code) and get the authors\' file again, or build it from the '
                            'TDC files')
        return ALLOWED_GLOBALS[module, name]


def allowed_globals():
    """{(module, name): object} of what numpy pickles arrays, dtypes and scalars with, under
    numpy 2's module paths (numpy._core) and numpy 1.x's (numpy.core, the authors' file);
    _codecs.encode is how pickle protocol 2 writes bytes."""
    allowed = {('numpy', 'ndarray'): np.ndarray, ('numpy', 'dtype'): np.dtype,
               ('_codecs', 'encode'): codecs.encode}
    for core in ('numpy._core', 'numpy.core'):
        allowed.update({(f'{core}.multiarray', '_reconstruct'): np._core.multiarray._reconstruct,
                        (f'{core}.multiarray', 'scalar'): np._core.multiarray.scalar,
                        (f'{core}.numeric', '_frombuffer'): np._core.numeric._frombuffer})
    return allowed


ALLOWED_GLOBALS = allowed_globals()


def read_pickle(path):
    """The object pickled in path, read by DataUnpickler; a corrupt file is a UserError."""
    try:
        with open(path, 'rb') as file:
            return DataUnpickler(file, path).load()
    except (pickle.UnpicklingError, EOFError, AttributeError, ImportError, ValueError) as error:
        raise UserError(f'{path} is corrupt or truncated ({error}); delete it and run again to '
                        'build it from the TDC files') from None


def write_pickle(data, path):
    """Pickles data to path through util.atomic_file: never a half-written file."""
    with util.atomic_file(path) as file:
        pickle.dump(data, file, protocol=pickle.HIGHEST_PROTOCOL)


def checked(data, path):
    """The pickle's dict with float32 features and int64 labels, after checking its layout."""
    fix = f'{path} is not the metabolism pickle; delete it and run again to build it anew'
    if not isinstance(data, dict):
        raise UserError(f'{path} holds a {type(data).__name__}, not a dict of data sets: {fix}')
    missing = [name for name in ALL_SETS if name not in data]
    if missing:
        raise UserError(f"{path} lacks the data sets {', '.join(missing)}: {fix}")
    result = {}
    for name in ALL_SETS:
        entry = data[name]
        if not isinstance(entry, dict) or not {'feature', 'label'} <= set(entry):
            raise UserError(f"{path}: {name} is not a dict with 'feature' and 'label': {fix}")
        features, labels = np.asarray(entry['feature']), np.asarray(entry['label'])
        if features.ndim != 2 or features.shape[1] != NUM_BITS or labels.shape != (len(features),):
            raise UserError(f'{path}: {name} has features of shape {features.shape} and labels '
                            f'of shape {labels.shape}, expected (n, {NUM_BITS}) and (n,): {fix}')
        if not np.isin(labels, (0, 1)).all():
            raise UserError(f'{path}: {name} has labels other than 0 and 1: {fix}')
        result[name] = {'feature': features.astype(np.float32, copy=False),
                        'label': labels.astype(np.int64, copy=False)}
    return result


# ----- sampling tasks (sampling.py: the contract) -----
class MetabolismDataset:
    """Binary tasks of one split, indexed by data set: a task draws distinct molecules per class.

    The molecules of all the split's data sets live in one tensor on the training device; a
    batch's rows are drawn on the host (CPU generator) and reach the device in one copy, and
    its features come out of one index_select.

    Args:
        features (list of torch.Tensor): float32 fingerprints of each data set, shape (n_i, 1024)
        labels (list of torch.Tensor): int64 0/1 labels of each data set, shape (n_i,)
        num_support (int): number of support molecules per class
        num_query (int): number of query molecules per class
        generator (torch.Generator): draws which molecules a task uses
    """

    def __init__(self, features, labels, num_support, num_query, generator):
        self._features = torch.cat(features)
        offsets = np.cumsum([0] + [len(y) for y in labels])
        # Rows (into self._features) of each data set's class 0 and class 1, on the host.
        self._class_rows = [[torch.nonzero(y.cpu() == c).squeeze(1) + offset
                             for c in range(NUM_WAY)] for y, offset in zip(labels, offsets)]
        self._num_support = num_support
        self._num_query = num_query
        self._generator = generator

    def _rows(self, set_idx):
        """Rows of one task's molecules, shape (2, num_support + num_query), distinct per class."""
        num_molecules = self._num_support + self._num_query
        return torch.stack([class_rows[torch.randperm(len(class_rows),
                                                      generator=self._generator)[:num_molecules]]
                            for class_rows in self._class_rows[set_idx]])

    def make_tasks(self, set_idxs):
        """Builds one task per entry of set_idxs.

        Args:
            set_idxs (torch.Tensor): int64 indices into the split's data sets, shape (num_tasks,)

        Returns:
            sampling.TaskBatch of num_tasks tasks (features_support, labels_support,
            features_query, labels_query), shapes (num_tasks, 2 * num_support, 1024),
            (num_tasks, 2 * num_support), (num_tasks, 2 * num_query, 1024),
            (num_tasks, 2 * num_query); class-major order, label = class.
        """
        k, q = self._num_support, self._num_query
        rows = torch.stack([self._rows(set_idx) for set_idx in set_idxs.tolist()])
        rows = util.host_to_device(rows, self._features.device)
        support, query = (self._features.index_select(0, part.flatten()).view(*part.shape[:2], -1)
                          for part in (rows[:, :, :k].flatten(1), rows[:, :, k:].flatten(1)))
        classes = torch.arange(NUM_WAY, device=self._features.device)
        return sampling.TaskBatch(support, classes.repeat_interleave(k).expand(len(rows), -1),
                                  query, classes.repeat_interleave(q).expand(len(rows), -1))


def check_task_flags(num_way, num_support, num_query):
    """Raises UserError for a task shape no data can provide; needs no data, so scripts call it
    before loading."""
    if num_way != NUM_WAY:
        raise UserError(f'--num_way {num_way}: the metabolism data is binary (labels 0 and 1); '
                        f'use --num_way {NUM_WAY}')
    check_positive(num_support=num_support, num_query=num_query)


def check_task_shape(data, names, num_way, num_support, num_query):
    """Raises UserError for a task shape the split's data sets cannot provide."""
    check_task_flags(num_way, num_support, num_query)
    for name in names:
        counts = np.bincount(data[name]['label'], minlength=NUM_WAY)
        for label, count in enumerate(counts):
            if count < num_support + num_query:
                raise UserError(f'{name} has {count} molecules of class {label}, fewer than '
                                f'num_support + num_query = {num_support + num_query}; '
                                'lower --num_support or --num_query')


def metabolism_task_loader(data, split, batch_size, num_way, num_support, num_query,
                           num_tasks_per_epoch, seed=0, device='cpu'):
    """A TaskLoader of num_tasks_per_epoch // batch_size batches of split's tasks, from data.

    data is load_metabolism's dict; loading it once serves every split.
    """
    if split not in SPLIT_SETS:
        raise UserError(f"unknown split '{split}'; use one of {', '.join(SPLIT_SETS)}")
    names = SPLIT_SETS[split]
    check_task_shape(data, names, num_way, num_support, num_query)
    check_positive(batch_size=batch_size)
    generator = sampling.split_generator(seed, split)
    features = [torch.from_numpy(data[name]['feature']).to(device) for name in names]
    labels = [torch.from_numpy(data[name]['label']) for name in names]
    dataset = MetabolismDataset(features, labels, num_support, num_query, generator)
    sampler = sampling.UniformSampler(len(names), generator)
    return sampling.TaskLoader(dataset, sampler, batch_size, num_tasks_per_epoch // batch_size,
                               generator)


class MetabolismTasks:
    """TDC Metabolism as the one main body (training.main) samples it: a task source (sampling.py).

    The task shape is checked here, before any data is loaded or downloaded.

    Args:
        datadir (str): folder of metabolism_data_new.pkl or the raw TDC files
        num_way, num_support, num_query (int): the task shape
        seed (int): seeds the task stream of every split
    """

    def __init__(self, datadir, num_way, num_support, num_query, seed=0, fingerprint='bits'):
        check_task_flags(num_way, num_support, num_query)
        self._datadir = datadir
        self._fingerprint = fingerprint
        self._shape = (num_way, num_support, num_query)
        self._seed = seed
        self._data = None

    def prepare(self):
        self._data = load_metabolism(self._datadir, self._fingerprint)
        return f'The metabolism data is ready in {self._datadir}.'

    def loader(self, split, batch_size, num_tasks, device):
        return metabolism_task_loader(self._data, split, batch_size, *self._shape, num_tasks,
                                      seed=self._seed, device=device)


def get_metabolism_dataloader(datadir, split, batch_size, num_way, num_support, num_query,
                              num_tasks_per_epoch, seed=0, device='cpu'):
    """Loads (or builds) the data in datadir and returns metabolism_task_loader's TaskLoader."""
    return metabolism_task_loader(load_metabolism(datadir), split, batch_size, num_way,
                                  num_support, num_query, num_tasks_per_epoch, seed, device)
