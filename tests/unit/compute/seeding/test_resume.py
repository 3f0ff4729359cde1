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

"""Resume files: written whole, and none kept for an image without a base copy."""

from nova_torrent_images.compute.seeding.resume import ResumeFiles


def test_resume_data_without_a_base_copy_is_removed(tmp_path):
    resume = ResumeFiles(str(tmp_path))
    resume.save("kept", b"a")
    resume.save("orphan", b"b")
    assert resume.image_ids() == ["kept", "orphan"]
    assert resume.remove_orphans(lambda: ["kept"]) == ["orphan"]
    assert resume.image_ids() == ["kept"] and resume.load("kept") == b"a"


def test_resume_data_written_while_the_store_is_listed_is_kept(tmp_path):
    resume = ResumeFiles(str(tmp_path))

    def listing_during_a_commit():
        resume.save("committed-meanwhile", b"c")  # after the listing began
        return []

    assert resume.remove_orphans(listing_during_a_commit) == []
    assert resume.load("committed-meanwhile") == b"c"


def test_no_directory_yet_means_no_resume_data(tmp_path):
    resume = ResumeFiles(str(tmp_path / "seeds"))
    assert resume.image_ids() == [] and resume.remove_orphans(lambda: []) == []
