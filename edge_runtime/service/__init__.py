"""The drop-folder watch service (`edge-inspect --watch`): watch.py finds complete files, recorder.py records
each exactly once and moves it; fileops, inotify, lock (one instance), stats (counters), sd_notify (systemd).
Starts the fleet integration (edge_runtime.fleet) when configured."""
