"""metabolism.py: fingerprints, building from TDC files, the pickle, the task sampler, user errors.

The real TDC files come from conftest.py's `tdc_raw` folder (../shared's, else fetched). The
`built` fixture of conftest.py builds them once per test run (about 15 s) through a
file:// TDC_MIRROR; every other test uses that result or a few tiny synthetic files.
"""
import csv
import pickle
import shutil

import numpy as np
import pytest
import torch
from rdkit import Chem
from rdkit.Chem import rdFingerprintGenerator

import metabolism
import reference
from util import UserError

# Rows and Y=1 counts of each file, from raw_tdc's SOURCES.md.
EXPECTED = {'CYP1A2_Veith': (12579, 5829), 'CYP2C19_Veith': (12665, 5819),
            'CYP2C9_Veith': (12092, 4045), 'CYP2D6_Veith': (13130, 2514),
            'CYP3A4_Veith': (12328, 5110), 'CYP2C9_Substrate_CarbonMangels': (669, 141),
            'CYP2D6_Substrate_CarbonMangels': (667, 191),
            'CYP3A4_Substrate_CarbonMangels': (670, 355)}
TINY_ROWS = [('a', 'CCO', '0'), ('b', 'c1ccccc1', '1'), ('c', 'CC(=O)O', '0'), ('d', 'CCN', '1')]


def rows_sha256(rows):
    """metabolism.rows_sha256 of (Drug_ID, Drug, Y) rows."""
    return metabolism.rows_sha256([row[1] for row in rows], np.array([int(row[2]) for row in rows]))


# What TDC_ACCEPT_SHA256 takes for the tiny files these tests write in place of TDC's.
TINY_SHA256 = ','.join(rows_sha256(rows) for rows in (TINY_ROWS, TINY_ROWS[1:], TINY_ROWS[:3]))


def rdkit_bits(smiles):
    """Indices of the on-bits of a Morgan fingerprint (radius 2, 1024 bits), computed apart from
    metabolism.py: RDKit's unfolded sparse fingerprint, folded modulo 1024 by hand."""
    sparse = rdFingerprintGenerator.GetMorganGenerator(radius=2).GetSparseFingerprint(
        Chem.MolFromSmiles(smiles))
    return sorted({bit % 1024 for bit in sparse.GetOnBits()})


def read_raw(folder, name):
    with open(folder / (name.lower() + '.tab'), newline='') as file:
        return list(csv.DictReader(file, delimiter='\t'))


def write_table(path, rows, header=('Drug_ID', 'Drug', 'Y'), delimiter='\t'):
    with open(path, 'w', newline='') as file:
        csv.writer(file, delimiter=delimiter).writerows([header, *rows])


def write_tiny_tables(folder, skip=()):
    """Writes a tiny valid .tab file for each data set but those in skip."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in metabolism.ALL_SETS:
        if name not in skip:
            write_table(folder / (name.lower() + '.tab'), TINY_ROWS)


@pytest.fixture(autouse=True)
def empty_mirror(tmp_path, monkeypatch):
    """No test reaches the network: by default the mirror is an empty folder. The tiny files
    are accepted in place of TDC's."""
    mirror = tmp_path / 'empty_mirror'
    mirror.mkdir()
    monkeypatch.setenv('TDC_MIRROR', str(mirror))
    monkeypatch.setenv('TDC_ACCEPT_SHA256', TINY_SHA256)
    return mirror


# ----- features -----
def test_fingerprints_match_rdkit_bits(tdc_raw):
    smiles = [row['Drug'] for name in ('CYP1A2_Veith', 'CYP2C9_Substrate_CarbonMangels')
              for row in read_raw(tdc_raw, name)[:3]]
    features, kept = metabolism.fingerprints(smiles)
    assert features.shape == (6, 1024) and features.dtype == np.uint8
    assert kept.tolist() == list(range(6))
    assert set(np.unique(features)) == {0.0, 1.0}
    for row, text in zip(features, smiles):
        assert np.flatnonzero(row).tolist() == rdkit_bits(text)


def rdkit_counts(smiles, feature_invariants=False):
    """A Morgan count fingerprint (radius 2) folded to 1024 by hand: RDKit's unfolded sparse
    counts, summed per bit modulo 1024."""
    invariants = (rdFingerprintGenerator.GetMorganFeatureAtomInvGen() if feature_invariants
                  else None)
    sparse = rdFingerprintGenerator.GetMorganGenerator(
        radius=2, atomInvariantsGenerator=invariants).GetSparseCountFingerprint(
            Chem.MolFromSmiles(smiles))
    folded = np.zeros(1024, dtype=np.int64)
    for bit, count in sparse.GetNonzeroElements().items():
        folded[bit % 1024] += count
    return folded


@pytest.mark.parametrize('kind', ['counts', 'fcfp_counts'])
def test_count_fingerprints_match_rdkit_counts_folded_by_hand(tdc_raw, kind):
    smiles = [row['Drug'] for name in ('CYP2D6_Veith', 'CYP3A4_Substrate_CarbonMangels')
              for row in read_raw(tdc_raw, name)[:4]]
    features, kept = metabolism.fingerprints(smiles, kind=kind)
    assert features.dtype == np.uint8 and kept.tolist() == list(range(8))
    assert features.max() > 1  # counts, not bits
    for row, text in zip(features, smiles):
        np.testing.assert_array_equal(row, rdkit_counts(text, kind == 'fcfp_counts'))
    bits, _ = metabolism.fingerprints(smiles)
    # ECFP counts set the bits' positions; the feature variant hashes other invariants
    assert np.array_equal(bits, features > 0) == (kind == 'counts')


def test_each_fingerprint_has_its_own_cache(tmp_path):
    write_tiny_tables(tmp_path)
    bits = metabolism.load_metabolism(tmp_path)
    counts = metabolism.load_metabolism(tmp_path, 'counts')
    assert sorted(p.name for p in tmp_path.glob('*.pkl')) == [
        'metabolism_data_counts.pkl', 'metabolism_data_new.pkl']
    name = metabolism.ALL_SETS[0]
    assert counts[name]['feature'].max() > 1 and bits[name]['feature'].max() == 1
    np.testing.assert_array_equal(metabolism.load_metabolism(tmp_path, 'counts')[name]['feature'],
                                  counts[name]['feature'])  # read back from its cache


def test_reference_bits_tell_radius_apart(tdc_raw):
    """The check above could fail: radius 3 sets other bits on these molecules."""
    text = read_raw(tdc_raw, 'CYP1A2_Veith')[0]['Drug']
    sparse = rdFingerprintGenerator.GetMorganGenerator(radius=3).GetSparseFingerprint(
        Chem.MolFromSmiles(text))
    assert sorted({bit % 1024 for bit in sparse.GetOnBits()}) != rdkit_bits(text)


def test_unparsable_smiles_reported_and_skipped(capfd):
    Chem.MolFromSmiles('C1CC')
    assert 'C1CC' in capfd.readouterr().err  # RDKit itself would log the error
    features, kept = metabolism.fingerprints(['CCO', 'C1CC', 'xyz', 'c1ccccc1', ''], 'toy')
    out, err = capfd.readouterr()
    assert kept.tolist() == [0, 3]
    assert features.shape == (2, 1024)
    assert np.flatnonzero(features[1]).tolist() == rdkit_bits('c1ccccc1')
    assert "toy: RDKit could not parse 3 of 5 SMILES" in out
    assert "'C1CC'" in out and "'xyz'" in out
    assert 'C1CC' not in err and 'SMILES Parse Error' not in err


def test_build_keeps_labels_aligned_with_parsed_rows(tmp_path, capsys):
    path = tmp_path / 'toy.tab'
    write_table(path, [('a', 'CCO', '1'), ('b', 'C1CC', '1'), ('c', 'c1ccccc1', '0')])
    data = metabolism.build({'toy': path})
    assert data['toy']['label'].tolist() == [1, 0]
    assert np.flatnonzero(data['toy']['feature'][1]).tolist() == rdkit_bits('c1ccccc1')
    assert 'could not parse 1 of 3' in capsys.readouterr().out


def test_unwritable_cache_still_returns_the_data(tmp_path, monkeypatch, capsys):
    write_tiny_tables(tmp_path)

    def fail(data, path):
        raise PermissionError('read-only file system')

    monkeypatch.setattr(metabolism, 'write_pickle', fail)
    data = metabolism.load_metabolism(tmp_path)
    assert data['CYP2D6_Veith']['label'].tolist() == [0, 1, 0, 1]
    assert 'Could not cache them' in capsys.readouterr().out


def test_csv_files_are_accepted(tmp_path):
    write_tiny_tables(tmp_path, skip=['CYP2C9_Veith'])
    write_table(tmp_path / 'cyp2c9_veith.csv', TINY_ROWS[:3], delimiter=',')
    data = metabolism.load_metabolism(tmp_path)
    assert data['CYP2C9_Veith']['label'].tolist() == [0, 1, 0]
    assert data['CYP1A2_Veith']['label'].tolist() == [0, 1, 0, 1]


# ----- the full build and its cache -----
def test_build_through_mirror(built, tdc_raw):
    datadir, data, out, seconds = built
    for name in metabolism.ALL_SETS:  # downloaded byte for byte
        assert (datadir / (name.lower() + '.tab')).read_bytes() == (
            tdc_raw / (name.lower() + '.tab')).read_bytes()
    assert 'Built Morgan fingerprints of 64800 molecules (bits) in' in out
    assert f'Cached them in {datadir / metabolism.CACHE_NAME}.' in out
    assert not list(datadir.glob('.tmp_*')) and not list(datadir.glob('*.part'))
    assert list(data) == list(metabolism.ALL_SETS)
    for name, (rows, positives) in EXPECTED.items():
        assert data[name]['feature'].shape == (rows, 1024)
        assert data[name]['feature'].dtype == np.float32
        assert data[name]['label'].dtype == np.int64
        assert int(data[name]['label'].sum()) == positives
        assert data[name]['feature'].sum(axis=1).min() > 0  # no molecule left as zeros


def test_built_rows_match_raw_rows(built, tdc_raw):
    data = built[1]
    for name in ('CYP2D6_Veith', 'CYP3A4_Substrate_CarbonMangels'):
        raw = read_raw(tdc_raw, name)
        for i in (0, 1, len(raw) // 2, len(raw) - 1):
            assert np.flatnonzero(data[name]['feature'][i]).tolist() == rdkit_bits(raw[i]['Drug'])
            assert data[name]['label'][i] == int(raw[i]['Y'])


def test_pickle_layout(built):
    datadir, data = built[:2]
    with open(datadir / metabolism.CACHE_NAME, 'rb') as file:
        stored = pickle.load(file)
    assert set(stored) == set(metabolism.ALL_SETS)
    for name, entry in stored.items():
        assert set(entry) == {'feature', 'label'}
        n = EXPECTED[name][0]
        assert entry['feature'].shape == (n, 1024) and entry['label'].shape == (n,)
        assert set(np.unique(entry['label'])) == {0, 1}
        assert np.array_equal(entry['feature'], data[name]['feature'])


def test_second_start_loads_the_cache_without_building(built, monkeypatch):
    datadir, data = built[:2]
    monkeypatch.setattr(metabolism, 'build', None)  # a rebuild would fail
    again = metabolism.load_metabolism(datadir)
    for name in metabolism.ALL_SETS:
        assert np.array_equal(again[name]['feature'], data[name]['feature'])
        assert np.array_equal(again[name]['label'], data[name]['label'])


def authors_pickle(protocol):
    """(stored dict, pickle bytes) in the authors' layout: float64 features and labels, as
    numpy 1.x writes them for protocol 2 (module paths numpy.core, not numpy 2's numpy._core)."""
    rng = np.random.default_rng(0)
    stored = {name: {'feature': rng.integers(0, 2, (7, 1024)).astype(np.float64),
                     'label': np.array([0., 1., 1., 0., 1., 0., 0.])}
              for name in metabolism.ALL_SETS}
    pickled = pickle.dumps(stored, protocol=protocol)
    if protocol == 2:
        assert pickled.count(b'numpy._core.multiarray\n_reconstruct') == 1
        pickled = pickled.replace(b'numpy._core.', b'numpy.core.')
    return stored, pickled


@pytest.mark.parametrize('protocol', [2, pickle.HIGHEST_PROTOCOL])
def test_authors_pickle_used_as_is(tmp_path, protocol):
    """The distributed pickle needs no TDC files; other dtypes are converted."""
    stored, pickled = authors_pickle(protocol)
    (tmp_path / metabolism.CACHE_NAME).write_bytes(pickled)
    data = metabolism.load_metabolism(tmp_path)
    for name in metabolism.ALL_SETS:
        assert data[name]['feature'].dtype == np.float32
        assert np.array_equal(data[name]['feature'], stored[name]['feature'])
        assert data[name]['label'].tolist() == [0, 1, 1, 0, 1, 0, 0]


def test_our_cache_round_trips_through_the_restricted_unpickler(tmp_path):
    write_tiny_tables(tmp_path)
    data = metabolism.build(metabolism.fetch_tables(tmp_path))
    metabolism.write_pickle(data, tmp_path / 'cache.pkl')
    again = metabolism.read_pickle(tmp_path / 'cache.pkl')
    assert list(again) == list(data)
    for name, entry in data.items():
        for key, array in entry.items():
            assert again[name][key].dtype == array.dtype
            np.testing.assert_array_equal(again[name][key], array)


@pytest.mark.parametrize('change, message', [
    (lambda d: d.pop('CYP2C9_Veith'), 'lacks the data sets CYP2C9_Veith'),
    (lambda d: d['CYP1A2_Veith'].update(feature=np.zeros((4, 512))), 'features of shape (4, 512)'),
    (lambda d: d['CYP1A2_Veith'].update(label=np.zeros(3)), 'labels of shape (3,)'),
    (lambda d: d['CYP2D6_Veith'].update(label=np.array([0, 1, 2, 1])), 'labels other than 0 and 1'),
    (lambda d: d['CYP2D6_Veith'].pop('label'), "not a dict with 'feature' and 'label'"),
])
def test_bad_pickle_is_a_user_error(tmp_path, change, message):
    stored = {name: {'feature': np.zeros((4, 1024)), 'label': np.array([0, 1, 0, 1])}
              for name in metabolism.ALL_SETS}
    change(stored)
    with open(tmp_path / metabolism.CACHE_NAME, 'wb') as file:
        pickle.dump(stored, file)
    with pytest.raises(UserError, match='delete it and run again') as error:
        metabolism.load_metabolism(tmp_path)
    assert message in str(error.value)


def test_truncated_pickle_is_a_user_error(tmp_path):
    (tmp_path / metabolism.CACHE_NAME).write_bytes(pickle.dumps({'a': 1})[:5])
    with pytest.raises(UserError, match='corrupt or truncated'):
        metabolism.load_metabolism(tmp_path)


# ----- bad raw files -----
def test_missing_files_name_each_data_set(tmp_path):
    datadir = tmp_path / 'data'
    write_tiny_tables(datadir, skip=['CYP2C19_Veith', 'CYP3A4_Veith'])
    with pytest.raises(UserError) as error:
        metabolism.load_metabolism(datadir)
    message = str(error.value)
    assert 'CYP2C19_Veith' in message and 'CYP3A4_Veith' in message
    assert 'TDC_MIRROR' in message and str(datadir) in message
    assert '\n' not in message
    assert not (datadir / metabolism.CACHE_NAME).exists()


def test_missing_files_are_fetched_from_a_mirror_folder(tmp_path, empty_mirror):
    datadir = tmp_path / 'data'
    write_tiny_tables(datadir, skip=['CYP2C19_Veith'])
    write_table(empty_mirror / 'cyp2c19_veith.tab', TINY_ROWS[1:])
    data = metabolism.load_metabolism(datadir)
    assert (datadir / 'cyp2c19_veith.tab').exists()
    assert data['CYP2C19_Veith']['label'].tolist() == [1, 0, 1]


def changed_copy(raw, name, folder):
    """Copies data set name's real file (in the folder raw) into folder with one byte changed (the first row's
    label); returns the new file's path."""
    folder.mkdir(parents=True, exist_ok=True)
    text = (raw / (name.lower() + '.tab')).read_text()
    header, first, rest = text.split('\n', 2)
    first = first[:-1] + ('1' if first[-1] == '0' else '0')
    path = folder / (name.lower() + '.tab')
    path.write_text('\n'.join([header, first, rest]))
    return path


def real_files(raw, folder, skip=()):
    """Copies the real TDC files (in the folder raw) but those in skip into folder."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in metabolism.ALL_SETS:
        if name not in skip:
            shutil.copy(raw / (name.lower() + '.tab'), folder)


NAME = 'CYP2C9_Substrate_CarbonMangels'


def test_changed_file_in_datadir_is_refused_with_both_digests(tmp_path, one_line_error, tdc_raw):
    real_files(tdc_raw, tmp_path, skip=[NAME])
    path = changed_copy(tdc_raw, NAME, tmp_path)
    line = one_line_error(lambda: metabolism.load_metabolism(tmp_path))
    pinned = metabolism.TDC_SHA256[NAME]
    found = metabolism.rows_sha256(*metabolism.read_table(path))
    assert found != pinned
    assert line == (f"error: {path} has rows of sha256 {found}, expected {pinned} (TDC's {NAME}): "
                    'delete it to download it again, or set TDC_ACCEPT_SHA256='
                    f'{found} to accept these rows knowingly')
    assert not (tmp_path / metabolism.CACHE_NAME).exists()


def test_changed_file_in_the_mirror_is_refused_and_not_kept(tmp_path, empty_mirror, tdc_raw):
    datadir = tmp_path / 'data'
    real_files(tdc_raw, empty_mirror, skip=[NAME])
    path = changed_copy(tdc_raw, NAME, empty_mirror)
    with pytest.raises(UserError) as error:  # downloads draw progress bars on stderr
        metabolism.load_metabolism(datadir)
    found = metabolism.rows_sha256(*metabolism.read_table(path))
    assert str(error.value) == (
        f"{path.as_uri()} has rows of sha256 {found}, expected {metabolism.TDC_SHA256[NAME]} "
        f"(TDC's {NAME}): check the source ($TDC_MIRROR, else TDC itself), or set "
        f'TDC_ACCEPT_SHA256={found} to accept these rows knowingly')
    assert not (datadir / path.name).exists()


def test_accepted_digest_lets_a_changed_file_through(tmp_path, monkeypatch, tdc_raw):
    path = changed_copy(tdc_raw, NAME, tmp_path)
    monkeypatch.setenv('TDC_ACCEPT_SHA256',
                       f'{TINY_SHA256},{metabolism.rows_sha256(*metabolism.read_table(path))}')
    metabolism.check_sha256(NAME, path)


def test_crlf_and_reordered_rows_match_the_pin(tmp_path, tdc_raw):
    lines = (tdc_raw / (NAME.lower() + '.tab')).read_text().splitlines()
    path = tmp_path / (NAME.lower() + '.tab')
    path.write_bytes('\r\n'.join([lines[0], *reversed(lines[1:])]).encode() + b'\r\n')
    assert path.read_bytes() != (tdc_raw / path.name).read_bytes()
    metabolism.check_sha256(NAME, path)


def test_official_source_is_dataverse(monkeypatch, tmp_path):
    monkeypatch.delenv('TDC_MIRROR')
    urls = []
    monkeypatch.setattr(metabolism.util, 'download', lambda url, path, fix: urls.append(url))
    monkeypatch.setattr(metabolism, 'check_sha256', lambda name, path, url: None)
    metabolism.fetch_tables(tmp_path)
    base = 'https://dataverse.harvard.edu/api/access/datafile'
    assert urls == [f'{base}/{metabolism.DATAVERSE_IDS[n]}' for n in metabolism.ALL_SETS]
    assert len(set(urls)) == 8


def test_wrong_columns_are_a_user_error(tmp_path):
    write_tiny_tables(tmp_path)
    write_table(tmp_path / 'cyp2d6_veith.tab', TINY_ROWS, header=('id', 'smiles', 'Y'))
    with pytest.raises(UserError) as error:
        metabolism.load_metabolism(tmp_path)
    message = str(error.value)
    assert 'cyp2d6_veith.tab' in message and "['id', 'smiles', 'Y']" in message
    assert 'Drug_ID, Drug, Y' in message


@pytest.mark.parametrize('label', ['2', '-1', 'yes', '0.5', ''])
def test_labels_other_than_0_1_are_a_user_error(tmp_path, label):
    write_tiny_tables(tmp_path)
    write_table(tmp_path / 'cyp2c9_veith.tab', [*TINY_ROWS, ('e', 'CCC', label)])
    with pytest.raises(UserError) as error:
        metabolism.load_metabolism(tmp_path)
    assert f"cyp2c9_veith.tab line 6 has label Y = {label!r}, expected 0 or 1" in str(error.value)


# ----- task shapes the data cannot give -----
def test_too_few_molecules_names_data_set_class_and_counts(built):
    data = built[1]
    metabolism.metabolism_task_loader(data, 'train', 1, 2, 100, 41, 1)  # 141 positives: enough
    with pytest.raises(UserError) as error:
        metabolism.metabolism_task_loader(data, 'train', 1, 2, 100, 42, 1)
    message = str(error.value)
    assert 'CYP2C9_Substrate_CarbonMangels has 141 molecules of class 1' in message
    assert 'num_support + num_query = 142' in message and '--num_query' in message


@pytest.mark.parametrize('num_way', [1, 3, 5])
def test_num_way_other_than_2_is_a_user_error(num_way):
    with pytest.raises(UserError, match='binary.*--num_way 2'):
        metabolism.metabolism_task_loader(synthetic_data(), 'train', 1, num_way, 1, 1, 1)


def test_unknown_split_is_a_user_error():
    with pytest.raises(UserError, match="unknown split 'valid'"):
        metabolism.metabolism_task_loader(synthetic_data(), 'valid', 1, 2, 1, 1, 1)


# ----- the task sampler -----
def synthetic_data(n=30, num_negatives=12):
    """Every set: n molecules whose features say who they are. Column 0: a globally unique id,
    column 1: the label, column 2: the data set's index in ALL_SETS."""
    data = {}
    for s, name in enumerate(metabolism.ALL_SETS):
        labels = np.r_[np.zeros(num_negatives), np.ones(n - num_negatives)].astype(np.int64)
        labels = np.random.default_rng(s).permutation(labels)
        features = np.zeros((n, 1024), dtype=np.float32)
        features[:, 0] = s * n + np.arange(n)
        features[:, 1] = labels
        features[:, 2] = s
        data[name] = {'feature': features, 'label': labels}
    return data


def tasks_of(loader):
    return [task for batch in loader for task in batch]


def test_tasks_on_real_data(built):
    data = built[1]
    loader = metabolism.metabolism_task_loader(data, 'train', 4, 2, 5, 10, 42)
    batches = list(loader)
    assert len(loader) == len(batches) == 10
    assert all(len(batch) == 4 for batch in batches)
    # What (fingerprint, label) pairs each training data set holds.
    pairs = {name: {(bits.tobytes(), int(y)) for bits, y in zip(
        np.packbits(data[name]['feature'].astype(bool), axis=1), data[name]['label'])}
        for name in metabolism.TRAIN_SETS}
    for features_support, labels_support, features_query, labels_query in tasks_of(batches):
        assert features_support.shape == (10, 1024) and features_support.dtype == torch.float32
        assert features_query.shape == (20, 1024) and features_query.dtype == torch.float32
        assert labels_support.tolist() == [0] * 5 + [1] * 5
        assert labels_query.tolist() == [0] * 10 + [1] * 10
        assert labels_support.dtype == labels_query.dtype == torch.int64
        features = torch.cat([features_support, features_query]).numpy()
        labels = torch.cat([labels_support, labels_query]).tolist()
        task = {(bits.tobytes(), y) for bits, y in zip(np.packbits(features.astype(bool), axis=1),
                                                       labels)}
        assert any(task <= held for held in pairs.values())  # one data set, true labels


def test_a_batch_is_drawn_as_one_task_and_one_class_at_a_time(built):
    """The batched sampler (rows drawn for the whole batch, one copy, one index_select) gives
    the tasks of a plain per-task, per-class draw from the same generator state."""
    data = built[1]
    features = [torch.from_numpy(data[name]['feature']) for name in metabolism.TRAIN_SETS]
    labels = [torch.from_numpy(data[name]['label']) for name in metabolism.TRAIN_SETS]
    ours, theirs = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    dataset = metabolism.MetabolismDataset(features, labels, 3, 4, ours)
    set_idxs = torch.tensor([4, 0, 4, 2, 3, 1])
    class_rows = [[torch.nonzero(y == c).squeeze(1) for c in (0, 1)] for y in labels]
    for _ in range(2):  # the generators stay in step across batches
        expected = reference.metabolism_tasks(features, class_rows, set_idxs, 3, 4, theirs)
        for task, plain in zip(dataset.make_tasks(set_idxs), expected, strict=True):
            for a, b in zip(task, plain, strict=True):
                assert torch.equal(a, b)


def test_task_is_one_data_set_class_major_distinct_molecules():
    data = synthetic_data()
    k, q = 3, 9  # 12 negatives per set: every one of them in each task
    for split in ('train', 'val', 'test'):
        for task in tasks_of(metabolism.metabolism_task_loader(data, split, 5, 2, k, q, 50)):
            features_support, labels_support, features_query, labels_query = task
            features = torch.cat([features_support, features_query])
            ids = features[:, 0].tolist()
            assert len(set(ids)) == 2 * (k + q)  # distinct within and between support and query
            assert torch.equal(features_support[:, 1].long(), labels_support)
            assert torch.equal(features_query[:, 1].long(), labels_query)
            assert labels_support.tolist() == [0] * k + [1] * k
            assert len(set(features[:, 2].tolist())) == 1  # one data set per task
            name = metabolism.ALL_SETS[int(features[0, 2])]
            assert name in metabolism.SPLIT_SETS[split]


def test_data_set_chosen_uniformly():
    loader = metabolism.metabolism_task_loader(synthetic_data(), 'train', 100, 2, 1, 1, 3000)
    sets = [int(task[0][0, 2]) for task in tasks_of(loader)]
    counts = np.bincount(sets, minlength=len(metabolism.ALL_SETS))
    assert counts[5:].sum() == 0  # only the 5 training sets
    assert np.all(np.abs(counts[:5] - 600) < 100)  # binomial sd about 22


def test_seeding():
    def first_batches(split, seed):
        loader = metabolism.metabolism_task_loader(synthetic_data(), split, 4, 2, 2, 3, 12,
                                                   seed=seed)
        return [tensor for task in tasks_of(loader) for tensor in task]

    def same(a, b):
        return all(torch.equal(x, y) for x, y in zip(a, b))

    assert same(first_batches('train', 0), first_batches('train', 0))
    assert not same(first_batches('train', 0), first_batches('train', 1))
    assert not same(first_batches('val', 0), first_batches('test', 0))


def test_state_dict_resumes_the_same_tasks():
    def loader():
        return metabolism.metabolism_task_loader(synthetic_data(), 'train', 2, 2, 2, 3, 20, seed=3)

    first = loader()
    batches = iter(first)
    next(batches)
    state = first.state_dict()
    expected = next(batches)
    resumed = loader()
    resumed.load_state_dict(state)
    got = next(iter(resumed))
    assert all(torch.equal(x, y) for a, b in zip(expected, got) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for a, b in zip(next(iter(loader())), got)
                   for x, y in zip(a, b))


def test_get_metabolism_dataloader_reads_datadir(tmp_path):
    write_tiny_tables(tmp_path)
    loader = metabolism.get_metabolism_dataloader(tmp_path, 'val', 3, 2, 1, 1, 7, seed=0,
                                                  device='cpu')
    assert len(loader) == 2
    batch = next(iter(loader))
    assert len(batch) == 3
    assert [tensor.shape for tensor in batch[0]] == [(2, 1024), (2,), (2, 1024), (2,)]
