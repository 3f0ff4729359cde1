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

"""The one length-and-hash check, and the files it is applied to."""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import os
from unittest import mock

import pytest

from nova_torrent_images import exception
from nova_torrent_images.glance import verify
from nova_torrent_images.testing.images import image_info

DATA = os.urandom(200_000)
DIGEST = hashlib.sha512(DATA).hexdigest()


def image(**props):
    return image_info(DATA, "img-v", **props)


# -- check_digest ----------------------------------------------------------------------
def test_check_digest_accepts_the_image():
    verify.check_digest(image(), len(DATA), DIGEST)


def test_check_digest_goes_through_compare_digest():
    with mock.patch.object(verify.hmac, "compare_digest", wraps=hmac.compare_digest) as cmp:
        verify.check_digest(image(), len(DATA), DIGEST)
        with pytest.raises(exception.IntegrityError):
            verify.check_digest(image(), len(DATA), "0" * len(DIGEST))
    assert cmp.call_count == 2


def test_check_digest_wrong_hash():
    wrong = hashlib.sha512(b"something else").hexdigest()
    with pytest.raises(exception.IntegrityError) as err:
        verify.check_digest(image(), len(DATA), wrong)
    message = str(err.value)
    assert "img-v" in message and "sha512" in message and wrong in message and DIGEST in message


@pytest.mark.parametrize("length", [len(DATA) - 1, len(DATA) + 1, 0])
def test_check_digest_wrong_length(length):
    with pytest.raises(exception.IntegrityError, match=f"img-v: length .* is {length} bytes"):
        verify.check_digest(image(), length, DIGEST)


def test_check_digest_none_checks_the_length_only():
    verify.check_digest(image(), len(DATA), None)
    with pytest.raises(exception.IntegrityError, match="length"):
        verify.check_digest(image(), len(DATA) - 1, None)


def test_check_digest_ignores_hex_case():
    verify.check_digest(image(), len(DATA), DIGEST.upper())


def test_check_digest_non_ascii_expected_is_a_mismatch_not_a_crash():
    odd = dataclasses.replace(image(), hash_value="é" * len(DIGEST))
    with pytest.raises(exception.IntegrityError):
        verify.check_digest(odd, len(DATA), DIGEST)


# -- verify_file -----------------------------------------------------------------------
def test_verify_file_accepts_the_image(tmp_path):
    path = tmp_path / "img"
    path.write_bytes(DATA)
    verify.verify_file(image(), str(path))


def test_verify_file_goes_through_compare_digest(tmp_path):
    path = tmp_path / "img"
    path.write_bytes(DATA)
    with mock.patch.object(verify.hmac, "compare_digest", wraps=hmac.compare_digest) as cmp:
        verify.verify_file(image(), str(path))
    cmp.assert_called_once()


@pytest.mark.parametrize(
    ("body", "what"),
    [
        (DATA[:-1], "length"),
        (DATA + b"x", "length"),
        (DATA[:-1] + bytes([DATA[-1] ^ 1]), "sha512"),
    ],
)
def test_verify_file_rejects(tmp_path, body, what):
    path = tmp_path / "img"
    path.write_bytes(body)
    with pytest.raises(exception.IntegrityError, match=f"img-v: {what}"):
        verify.verify_file(image(), str(path))


def test_verify_file_prefix_of_a_larger_slot(tmp_path):
    path = tmp_path / "slot"
    path.write_bytes(DATA + b"\0" * 4096)
    verify.verify_file(image(), str(path), exact_size=False)
    with pytest.raises(exception.IntegrityError, match="length"):
        verify.verify_file(image(), str(path))


# -- destinations ----------------------------------------------------------------------
def test_discard_removes_a_file_and_tolerates_none(tmp_path):
    path = tmp_path / "partial"
    path.write_bytes(b"half")
    verify.discard(str(path))
    assert not path.exists()
    verify.discard(str(path))


def test_is_block_device():
    assert not verify.is_block_device(__file__)
    assert not verify.is_block_device("/nonexistent/nowhere")


# -- StreamingCheck.catch_up -------------------------------------------------------------
def test_catch_up_hashes_finished_bytes_and_finish_reads_only_the_rest(tmp_path):
    path = tmp_path / "img"
    path.write_bytes(DATA)
    check = verify.StreamingCheck(image())
    assert check.catch_up(str(path), 65_536) == 65_536
    assert check.catch_up(str(path), 65_536) == 0  # nothing new
    assert check.streamed == 65_536
    with mock.patch.object(verify.hashing, "hash_prefix", wraps=verify.hashing.hash_prefix) as rest:
        check.finish(str(path))
    assert rest.call_args.args[3] == 65_536  # read from there on, not from 0


def test_catch_up_uses_offered_bytes_instead_of_reading_them(tmp_path):
    # On disk the middle differs: the digest matches only if the offered bytes are used.
    path = tmp_path / "img"
    path.write_bytes(DATA[:50_000] + b"\0" * 50_000 + DATA[100_000:])
    check = verify.StreamingCheck(image())
    check.offer(50_000, DATA[50_000:100_000])
    assert check.catch_up(str(path), len(DATA)) == len(DATA) - 50_000
    assert check.streamed == len(DATA)
    check.finish(str(path))


def test_catch_up_never_hashes_past_the_image(tmp_path):
    path = tmp_path / "slot"
    path.write_bytes(DATA + b"rounded up to the allocation unit")
    check = verify.StreamingCheck(image())
    assert check.catch_up(str(path), len(DATA) + 4096) == len(DATA)
    check.finish(str(path), exact_size=False)


def test_catch_up_on_a_short_file_stops_and_finish_refuses(tmp_path):
    path = tmp_path / "img"
    path.write_bytes(DATA[:1000])
    check = verify.StreamingCheck(image())
    assert check.catch_up(str(path), len(DATA)) == 0
    with pytest.raises(exception.IntegrityError):
        check.finish(str(path))
