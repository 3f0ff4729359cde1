# Licensed under the Apache License, Version 2.0 (the "License"); you may
# not use this file except in compliance with the License. You may obtain
# a copy of the License at
#
#      http://www.apache.org/licenses/LICENSE-2.0
#
# Unless required by applicable law or agreed to in writing, software
# distributed under the License is distributed on an "AS IS" BASIS, WITHOUT
# WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied. See the
# License for the specific language governing permissions and limitations
# under the License.

"""The origin's registry: the sidecar schema, atomic entries, unfinished and broken ones."""

from __future__ import annotations

import json
import os

import pytest

from nova_torrent_images import exception
from nova_torrent_images.glance.image import parse_image
from nova_torrent_images.origin.registry import (
    SIDECAR,
    PublishedImage,
    Registry,
    validate_image_id,
)
from tests.unit.origin.fakes import IMAGE_ID, OTHER_ID, FakeGlance

V1 = "a032c04529155591311086ece722fe9fc98d7051"
V2 = "9c570948fe2719895f5376ab18e177f3598f76c12a505e71127633f1af60ae5f"


def entry(image_id: str = IMAGE_ID, **fields) -> PublishedImage:
    values = {
        "image_id": image_id,
        "size": 5,
        "hash_algo": "sha512",
        "hash_value": "ab" * 64,
        "info_hash_v1": V1,
        "info_hash_v2": V2,
        "piece_length": 262144,
        "num_pieces": 1,
        "magnet": f"magnet:?xt=urn:btmh:1220{V2}",
        "published_at": "2026-01-01T00:00:00Z",
    }
    values.update(fields)
    return PublishedImage(**values)


def commit(registry: Registry, published: PublishedImage, data: bytes = b"bytes") -> PublishedImage:
    staging = registry.stage(published.image_id)
    with open(staging.data_path, "wb") as f:
        f.write(data)
    with open(staging.torrent_path, "wb") as f:
        f.write(b"d4:infod6:lengthi5eee")
    return registry.commit(staging, published)


def test_registry_ignores_and_cleans_unfinished_entries(tmp_path):
    registry = Registry(str(tmp_path)).ensure()
    staging = registry.stage(IMAGE_ID)
    open(staging.data_path, "wb").close()
    assert registry.list() == [] and registry.get(IMAGE_ID) is None
    os.utime(staging.directory, (0, 0))
    registry.cleanup_staging(older_than=60)
    assert os.listdir(registry.images_dir) == []


def test_commit_makes_a_whole_entry_appear(tmp_path):
    registry = Registry(str(tmp_path)).ensure()
    before = registry.signature()
    committed = commit(registry, entry())
    assert registry.signature() != before
    got = registry.get(IMAGE_ID)
    assert got == committed == entry()
    assert got.directory == registry.entry_dir(IMAGE_ID) and got.has_data()
    assert got.tracker_hashes == [V1, V2[:40]]
    assert registry.read_torrent(got) == b"d4:infod6:lengthi5eee"
    assert [e.image_id for e in registry.list()] == [IMAGE_ID]
    # No temporary file is left next to the sidecar.
    assert sorted(os.listdir(got.directory)) == sorted([SIDECAR, "image.torrent", IMAGE_ID])


def test_commit_replaces_an_older_entry_and_remove_takes_it_away(tmp_path):
    registry = Registry(str(tmp_path)).ensure()
    commit(registry, entry(size=5))
    commit(registry, entry(size=6), data=b"bytes!")
    assert registry.get(IMAGE_ID).size == 6 and registry.get(IMAGE_ID).has_data()
    assert registry.remove(IMAGE_ID).size == 6
    assert registry.get(IMAGE_ID) is None and registry.list() == []
    assert registry.remove(IMAGE_ID) is None  # removing twice is fine


def test_sidecar_round_trip_and_unknown_versions(tmp_path):
    published = entry(dropped_from_magnet=[f"dn={IMAGE_ID}"], set_torrentable=True)
    text = published.to_json()
    assert json.loads(text)["version"] == 1
    assert PublishedImage.from_json(text, "/d", "/d/x") == published
    with pytest.raises(ValueError, match="unknown sidecar version"):
        PublishedImage.from_json(json.dumps({**json.loads(text), "version": 2}), "/d", "/d/x")


def test_unreadable_sidecar_is_treated_as_unpublished(tmp_path, caplog):
    registry = Registry(str(tmp_path)).ensure()
    commit(registry, entry())
    commit(registry, entry(OTHER_ID))
    with open(os.path.join(registry.entry_dir(IMAGE_ID), SIDECAR), "w") as f:
        f.write("{not json")
    assert registry.get(IMAGE_ID) is None
    assert [e.image_id for e in registry.list()] == [OTHER_ID]
    assert "unreadable" in caplog.text


def test_save_rewrites_the_sidecar_but_never_resurrects_an_entry(tmp_path):
    registry = Registry(str(tmp_path)).ensure()
    committed = commit(registry, entry())
    registry.save(PublishedImage(**{**committed.__dict__, "magnet": "magnet:?new"}))
    assert registry.get(IMAGE_ID).magnet == "magnet:?new"
    registry.remove(IMAGE_ID)
    with pytest.raises(exception.RegistryError, match="no longer exists"):
        registry.save(committed)
    assert not os.path.exists(committed.directory)


def test_entries_match_glance_and_are_named_by_their_magnets():
    glance = FakeGlance()
    record = glance.add(size=5)
    published = entry(hash_value=record["os_hash_value"])
    assert published.matches(parse_image(record))
    assert not published.matches(parse_image({**record, "size": 6}))
    assert published.named_by(f"magnet:?xt=urn:btih:{V1}")
    assert published.named_by(f"magnet:?xt=urn:btmh:1220{V2}")
    assert not published.named_by("magnet:?xt=urn:btih:" + "1" * 40)
    assert not published.named_by("not a magnet") and not published.named_by(None)
    info = published.image_info()
    assert (info.id, info.size, info.hash_value) == (IMAGE_ID, 5, record["os_hash_value"])


@pytest.mark.parametrize("bad", ["../etc", ".hidden", "a/b", "", "x" * 300])
def test_image_ids_are_safe_file_names(bad):
    with pytest.raises(exception.NotPublishable, match="not a valid image id"):
        validate_image_id(bad)
