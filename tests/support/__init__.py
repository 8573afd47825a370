"""Helpers the tests share (not fixtures: those are in tests/conftest.py). One job per module:

    paths        the checkout (REPO) and the real-data sets (shared_data)
    waiting      wait_until: poll for a state, fail with what was last seen
    net          free_port
    mosquitto    a private Mosquitto broker (Broker) and paho-mqtt
    postgres     a throwaway PostgreSQL server (benchmarks/pgserver.py, the benchmarks' own starter)
    bundles      tiny bundles built through the real converter (formats /1 and /2), bundle copies
    tflrt        a Python with tflite-runtime 2.14
    unprivileged edge-inspect run as an unprivileged user
    images       test images (PNG bytes, random arrays, structured patterns)
    watch        the watch service's config, its records and its process
    collector    the central collector as a process, MQTT publishers
    messages     result messages for the collector: valid ones and a fuzz of hostile ones
    hostile      hostile names and labels, slow clients, a process's memory and threads
    review       a review site with known results, a client for its HTTP API, the review CLI
    training     a toy labelled dataset and a tiny training profile
    runs         a run folder as training writes it, converted to a bundle
    datasets     image folders for `train prepare`
    deploy       the shipped systemd unit, parsed and verified; install.sh
    inspect_output  edge-inspect's JSON lines
"""
