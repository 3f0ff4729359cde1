"""The origin side, on Glance API nodes: publish images as torrents and seed them.

* :mod:`.publish` -- ``Publisher`` (publish, unpublish, list, periodic check) and the
  on-disk ``Registry`` of published images;
* :mod:`.seeder` -- ``OriginSeeder``, the long-running first seed of every published image;
* :mod:`.tracker` -- opentracker whitelist writing and reload;
* :mod:`.promotion` -- publish images that are requested often;
* :mod:`.options` -- their ``[torrent_images]`` options.

Nothing is imported here: compute hosts load ``options`` through ``conf`` without pulling
in the origin's code.
"""
