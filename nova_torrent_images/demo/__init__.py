"""The demo: a local swarm of simulated compute hosts booting one published image.

``orchestrator`` runs in the ``nova-torrent-images demo`` process: origin, publishing,
progress bars, the closing table. ``compute_host`` runs once per simulated host, in its own
process, with its own 127.0.0.x address, libtorrent session and fake XenServer SR.
"""
