"""omniglot.py: download through a mirror, checksums, structure checks, pixels, splits, tasks."""
import hashlib
import io
import os
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

import omniglot
import util
from conftest import Payload
from util import UserError



@pytest.fixture(scope='module')
def images():
    return omniglot.prepare()


@pytest.fixture(scope='module')
def character_names(omniglot_zips):
    """'alphabet/character' of every class, in the order of the cache (sorted paths)."""
    names = set()
    for name in omniglot.OFFICIAL_MD5:
        with zipfile.ZipFile(omniglot_zips / name) as archive:
            names |= {'/'.join(n.split('/')[1:3]) for n in archive.namelist() if n.endswith('.png')}
    return sorted(names)


def test_download_through_file_mirror_gives_the_same_bytes(omniglot_zips, tmp_path,
                                                           monkeypatch):
    monkeypatch.setenv('OMNIGLOT_MIRROR', omniglot_zips.as_uri())
    paths = omniglot.fetch_zips(tmp_path)
    for path in paths:
        assert path.read_bytes() == (omniglot_zips / path.name).read_bytes()
    assert sorted(os.listdir(tmp_path)) == sorted(omniglot.OFFICIAL_MD5)  # no leftover files


def test_a_plain_folder_works_as_mirror_too(omniglot_zips, monkeypatch):
    monkeypatch.setenv('OMNIGLOT_MIRROR', str(omniglot_zips))
    assert util.source_url('OMNIGLOT_MIRROR', omniglot.OFFICIAL_URL) == (
        omniglot_zips.resolve().as_uri(), False)
    monkeypatch.delenv('OMNIGLOT_MIRROR')
    assert util.source_url('OMNIGLOT_MIRROR', omniglot.OFFICIAL_URL) == (omniglot.OFFICIAL_URL,
                                                                         True)


def test_checksum_mismatch_is_an_error_and_leaves_no_file(omniglot_zips, tmp_path):
    url = (omniglot_zips / 'images_evaluation.zip').as_uri()
    target = tmp_path / 'images_evaluation.zip'
    with pytest.raises(UserError, match='md5'):
        util.download(url, target, md5='0' * 32)
    assert list(tmp_path.iterdir()) == []
    digest = hashlib.md5((omniglot_zips / 'images_evaluation.zip').read_bytes()).hexdigest()
    util.download(url, target, md5=digest)
    assert target.read_bytes() == (omniglot_zips / 'images_evaluation.zip').read_bytes()


def test_unreachable_source_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv('OMNIGLOT_MIRROR', str(tmp_path / 'nowhere'))
    with pytest.raises(UserError, match='could not download.*OMNIGLOT_MIRROR'):
        omniglot.prepare(tmp_path / 'data')


def test_truncated_zip_is_a_clear_error(omniglot_zips, tmp_path):
    for name in omniglot.OFFICIAL_MD5:
        data = (omniglot_zips / name).read_bytes()
        (tmp_path / name).write_bytes(data[:len(data) // 2])
    with pytest.raises(UserError, match='corrupt or truncated'):
        omniglot.prepare(tmp_path)


def fake_characters(num_alphabets=50, num_characters=1623, num_images=20):
    blank = np.zeros((28, 28), np.uint8)
    return {f'alphabet{i % num_alphabets:02d}/character{i:04d}': [blank] * num_images
            for i in range(num_characters)}


def test_structure_validation_names_what_is_wrong():
    omniglot.check_characters(fake_characters(), 'src')
    with pytest.raises(UserError, match='found 49 alphabets, expected 50'):
        omniglot.check_characters(fake_characters(num_alphabets=49), 'src')
    with pytest.raises(UserError, match='found 1622 characters, expected 1623'):
        omniglot.check_characters(fake_characters(num_characters=1622), 'src')
    characters = fake_characters()
    characters['alphabet07/character0007'] = characters['alphabet07/character0007'][:19]
    with pytest.raises(UserError, match='alphabet07/character0007 has 19 images, expected 20'):
        omniglot.check_characters(characters, 'src')


def test_cache_shape_and_second_start_without_the_zips(images, monkeypatch):
    assert images.shape == (1623, 20, 28, 28) and images.dtype == np.uint8
    assert set(np.unique(images)) == {0, 1}
    monkeypatch.setattr(omniglot, 'fetch_zips', None)  # reading the zips again would fail
    np.testing.assert_array_equal(omniglot.prepare(), images)


@pytest.mark.parametrize('zip_name, member', [
    ('images_background.zip', 'images_background/Alphabet_of_the_Magi/character01/0709_01.png'),
    ('images_background.zip', 'images_background/Korean/character40/0682_07.png'),
    ('images_evaluation.zip', 'images_evaluation/Tengwar/character25/1555_20.png')])
def test_pixels_equal_the_original_resized(images, character_names, omniglot_zips, zip_name,
                                           member):
    with zipfile.ZipFile(omniglot_zips / zip_name) as archive:
        original = Image.open(io.BytesIO(archive.read(member)))
        folder = member.rsplit('/', 1)[0] + '/'
        names = sorted(n for n in archive.namelist() if n.startswith(folder) and n != folder)
    assert original.size == (105, 105) and original.mode == '1'
    # Course loader: 1 - pixel / 255 of the image resized with Pillow's default (nearest for '1').
    expected = 1 - np.asarray(original.resize((28, 28)).convert('L'), np.float32) / 255
    character = character_names.index('/'.join(member.split('/')[1:3]))
    np.testing.assert_array_equal(images[character, names.index(member)], expected)


def test_splits_are_disjoint_fixed_and_follow_the_sorted_shuffle(character_names):
    splits = {split: omniglot.split_classes(split) for split in omniglot.SPLITS}
    assert [len(s) for s in splits.values()] == [1100, 100, 423]
    assert sorted(np.concatenate(list(splits.values()))) == list(range(1623))
    shuffled = list(character_names)
    np.random.default_rng(0).shuffle(shuffled)
    assert [character_names[i] for i in splits['val']] == shuffled[1100:1200]
    with pytest.raises(UserError, match="unknown split 'dev'"):
        omniglot.split_classes('dev')


def test_tasks_have_the_documented_shapes_and_class_major_labels(images):
    loader = omniglot.get_omniglot_dataloader('val', 3, 4, 2, 5, 7)
    assert len(loader) == 2  # num_tasks_per_epoch // batch_size
    batch = next(iter(loader))
    assert len(batch) == 3
    val_classes = set(omniglot.split_classes('val').tolist())
    flat = images.reshape(1623, 20, 784).astype(np.float32)
    for images_support, labels_support, images_query, labels_query in batch:
        assert images_support.shape == (8, 1, 28, 28) and images_support.dtype == torch.float32
        assert images_query.shape == (20, 1, 28, 28)
        assert labels_support.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
        assert labels_query.tolist() == [c for c in range(4) for _ in range(5)]
        # Each class's 7 images are images of one validation character, none drawn twice.
        for c in range(4):
            task_images = torch.cat([images_support[labels_support == c],
                                     images_query[labels_query == c]]).flatten(1).numpy()
            found = [np.argwhere((flat == image).all(-1)) for image in task_images]
            characters = set.intersection(*({k for k, _ in f} for f in found))
            assert characters and characters <= val_classes
            character = characters.pop()
            draws = {j for f in found for k, j in f if k == character}
            assert len(draws) >= 7


def test_same_seed_same_tasks_other_seed_other_tasks():
    def first_batch(seed):
        return next(iter(omniglot.get_omniglot_dataloader('train', 2, 5, 1, 3, 2, seed=seed)))

    a, b, c = first_batch(0), first_batch(0), first_batch(1)
    assert all(torch.equal(x, y) for ta, tb in zip(a, b) for x, y in zip(ta, tb))
    assert not torch.equal(a[0][0], c[0][0])


def test_loader_state_restores_the_task_stream():
    loader = omniglot.get_omniglot_dataloader('train', 2, 5, 1, 3, 20)
    stream = iter(loader)
    next(stream)
    state = loader.state_dict()
    expected = next(stream)
    loader.load_state_dict(state)
    again = next(iter(loader))
    assert all(torch.equal(x, y) for tx, ty in zip(expected, again) for x, y in zip(tx, ty))


@pytest.mark.parametrize('sizes, message', [
    ((5, 10, 11), 'num_support \\+ num_query = 21'),
    ((1101, 1, 1), 'more than the 1100 classes'),
    ((5, 0, 1), '--num_support must be at least 1'),
    ((5, 1, 0), '--num_query must be at least 1')])
def test_impossible_task_shapes_are_clear_errors(sizes, message):
    with pytest.raises(UserError, match=message):
        omniglot.get_omniglot_dataloader('train', 2, *sizes, 4)


def test_course_resized_folder_is_read_as_the_zips_are(images, character_names, tmp_path):
    """The course's omniglot_resized files (black strokes on white, one folder per character)
    give the zips' images; three characters of it here (every one would take 10 s)."""
    chosen = [0, 700, 1622]
    for i in chosen:
        folder = tmp_path / 'omniglot_resized' / character_names[i]
        folder.mkdir(parents=True)
        for j, image in enumerate(images[i]):
            Image.fromarray(((1 - image) * 255).astype(np.uint8)).convert('1').save(
                folder / f'{j:02d}.png')
    characters = omniglot.read_resized_folder(tmp_path / 'omniglot_resized')
    assert list(characters) == [character_names[i] for i in chosen]
    np.testing.assert_array_equal(np.stack([np.stack(c) for c in characters.values()]),
                                  images[chosen])


def test_prepare_takes_the_course_folder_where_there_is_one(images, character_names, tmp_path,
                                                             monkeypatch):
    (tmp_path / 'omniglot_resized').mkdir()
    monkeypatch.chdir(tmp_path)
    read = []
    monkeypatch.setattr(omniglot, 'read_resized_folder', lambda folder: read.append(folder) or
                        dict(zip(character_names, map(list, images))))
    np.testing.assert_array_equal(omniglot.prepare(tmp_path / 'data'), images)
    assert read == [omniglot.RESIZED_DIR] and (tmp_path / 'data' / omniglot.CACHE_NAME).is_file()


def test_the_assignment_s_dataloader_works_with_our_dataset_and_sampler():
    """get_omniglot_dataloader of the assignment builds a torch DataLoader from
    OmniglotDataset(num_support, num_query) and OmniglotSampler(range, num_way, num_tasks)."""
    torch.manual_seed(0)
    dataset = omniglot.OmniglotDataset(2, 3)
    sampler = omniglot.OmniglotSampler(range(1100, 1200), 4, 6)
    assert isinstance(dataset, torch.utils.data.Dataset)
    assert isinstance(sampler, torch.utils.data.Sampler) and len(sampler) == 6
    loader = torch.utils.data.DataLoader(dataset=dataset, batch_size=3, sampler=sampler,
                                         num_workers=2, collate_fn=list, drop_last=True)
    batches = list(loader)
    assert len(batches) == 2 and all(len(batch) == 3 for batch in batches)
    named = torch.from_numpy(omniglot.prepare())[1100:1200].flatten(0, 1).flatten(1).float()
    other = torch.from_numpy(omniglot.prepare())[:1100].flatten(0, 1).flatten(1).float()
    for images_support, labels_support, images_query, labels_query in batches[0]:
        assert images_support.shape == (8, 1, 28, 28) and images_query.shape == (12, 1, 28, 28)
        assert labels_support.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
        for image in torch.cat([images_support, images_query]).flatten(1):
            # an image of the classes the range names (blank-free images are unique enough)
            assert (named == image).all(-1).any()
        assert not all((other == image).all(-1).any() for image in images_support.flatten(1))
    # a numpy key, as the assignment's sampler yields, gives the same task as a tuple
    torch.manual_seed(1)
    by_array = omniglot.OmniglotDataset(1, 1)[np.array([3, 1])]
    torch.manual_seed(1)
    by_tuple = omniglot.OmniglotDataset(1, 1)[(3, 1)]
    assert all(torch.equal(a, b) for a, b in zip(by_array, by_tuple))



def npy_bytes(array):
    whole = io.BytesIO()
    np.save(whole, array)
    return whole.getvalue()


@pytest.mark.parametrize('damage', ['cut short', 'pickled objects'])
def test_a_damaged_cache_is_refused_in_one_line(images, tmp_path, capsys, damage):
    cache = tmp_path / omniglot.CACHE_NAME
    marker = tmp_path / 'ran'
    if damage == 'cut short':
        cache.write_bytes(npy_bytes(images)[:len(npy_bytes(images)) // 2])
    else:  # loading it with pickles allowed would run the command
        np.save(cache, np.array([Payload(f'touch {marker}')]))
    assert omniglot.load_cache(cache) is None and not marker.exists()
    assert capsys.readouterr().out == (f'{cache} is cut short or damaged; rebuilding it from '
                                       'the zips.\n')


def test_a_damaged_cache_is_rebuilt_from_the_zips(images, omniglot_zips, tmp_path, capsys):
    for name in omniglot.OFFICIAL_MD5:
        (tmp_path / name).symlink_to(omniglot_zips / name)
    cache = tmp_path / omniglot.CACHE_NAME
    cache.write_bytes(npy_bytes(images)[:1000])
    np.testing.assert_array_equal(omniglot.prepare(tmp_path), images)
    assert 'rebuilding it from the zips' in capsys.readouterr().out
    assert cache.read_bytes() == npy_bytes(images)
