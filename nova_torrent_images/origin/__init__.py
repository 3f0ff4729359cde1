"""The origin side, on Glance API nodes: publish images as torrents and seed them.

* :mod:`.publish` -- ``Publisher`` (publish, unpublish, list, periodic check) and the
  on-disk ``Registry`` of published images;
* :mod:`.seeder` -- ``OriginSeeder``, the long-running first seed of every published image;
* :mod:`.tracker` -- opentracker whitelist writing and reload;
* :mod:`.promotion` -- publish images that are requested often.

Their ``[torrent_images]`` options are in :mod:`nova_torrent_images.conf.origin`, outside
this package, so registering the options loads no origin code. Nothing is imported here
either: importing one of these modules loads only what that module needs.
"""
