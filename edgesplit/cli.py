"""The one command: ``edgesplit <verb>``.

This module only parses arguments, calls one function of the role that owns
the verb, and reports.  Roles are imported lazily so that ``edgesplit device``
on a Raspberry Pi never imports TensorFlow.  Every error ends in
:func:`report_error`: one message, one fix, the error's exit code; a traceback
only with ``-v`` (accepted before or after the verb).  ``python -m device.service``
and ``python -m device.doctor`` run this same command.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys

log = logging.getLogger("edgesplit")


# --------------------------------------------------------------------- verbs
# Each verb: an ``add_<verb>(subparsers)`` that registers its parser and sets
# ``func`` to a ``run_<verb>(args) -> int`` calling into the owning role.

def add_train(sub):
    p = sub.add_parser("train", help="train (or load from the cache) a model of the zoo and print its test accuracy")
    p.add_argument("model", help="zoo name, e.g. paper-cnn")
    p.add_argument("--epochs", type=int, default=None, help="override the zoo's epoch count")
    p.add_argument("--force", action="store_true", help="retrain even if a cached model exists")
    p.set_defaults(func=run_train)


def run_train(args) -> int:
    from converter import zoo

    result = zoo.train(args.model, epochs=args.epochs, force=args.force)
    print(result.summary())
    return 0


def add_cuts(sub):
    p = sub.add_parser("cuts", help="list every valid cut of a model with its cost")
    p.add_argument("model", help="zoo name (e.g. paper-cnn) or a .keras file")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=run_cuts)


def run_cuts(args) -> int:
    from converter import cuts, zoo

    model = zoo.load_model(args.model)
    found = cuts.list_cuts(model)
    if args.json:
        print(json.dumps({"model": args.model, "cuts": [c.to_dict() for c in found]}, indent=2))
    else:
        print(cuts.format_table(found))
    return 0


DATA_HELP = ("your labelled images: a folder of class folders (D/<class>/*.jpg, as Keras' "
             "image_dataset_from_directory reads them), a folder of images with a labels.csv (file,label), or an "
             ".npz with x_train, y_train, x_test, y_test (optional labels); a folder with train/ and test/ "
             "brings its own split")


def add_data_options(p, *, preprocess: bool = True) -> None:
    """--data, --test-split, --seed (and --preprocess): the user's images, for every verb that needs them."""
    g = p.add_argument_group("your data")
    g.add_argument("--data", default=None, metavar="SPEC", help=DATA_HELP)
    g.add_argument("--test-split", type=float, default=None, metavar="F",
                   help="with one set of images: the fraction held out for parity (and attacked by the audit); "
                        "the rest calibrates (and is the attacker's); seeded, per class (default 0.2)")
    g.add_argument("--data-seed", type=int, default=0, metavar="S", help="seed of that split (default 0)")
    if preprocess:
        g.add_argument("--preprocess", default=None, metavar="SPEC",
                       help="how pixels 0..255 become the model's input, when the model does not say so itself "
                            "(a Rescaling layer): scale=1/127.5,offset=-1 | mean=0.485,0.456,0.406,std=0.229,"
                            "0.224,0.225 | range=-1:1; and resize=WxH, crop=WxH, fit=stretch|cover, "
                            "resample=bilinear|bicubic|... (default: tried on your images)")


def add_convert(sub):
    p = sub.add_parser("convert", help="split a model at a cut, quantize, check parity, write a bundle")
    p.add_argument("model", help="zoo name (e.g. paper-cnn) or a .keras file")
    p.add_argument("--cut", required=True, help="layer whose output is sent (see `edgesplit cuts MODEL`)")
    p.add_argument("--quant", choices=["int8", "float16", "dynamic", "none"], default="int8")
    p.add_argument("--calibration", type=int, default=None, metavar="N",
                   help="training images used to calibrate int8 quantization (default 500, or all when fewer)")
    p.add_argument("--parity-n", type=int, default=2000, metavar="N",
                   help="held-out test images for the parity check (default 2000)")
    p.add_argument("--min-agreement", type=float, default=None,
                   help="fail when head+tail agree with Keras on fewer than this fraction of images "
                        "(default 0.99 for paper-cnn)")
    p.add_argument("--out", required=True, help="bundle directory to write (a .tar.gz is written beside it)")
    add_data_options(p)
    p.set_defaults(func=run_convert)


def run_convert(args) -> int:
    from converter import bundle

    result = bundle.convert(args.model, cut=args.cut, quant=args.quant, calibration=args.calibration,
                            out=args.out, min_agreement=args.min_agreement, parity_n=args.parity_n,
                            data=args.data, test_split=args.test_split, seed=args.data_seed,
                            preprocess=args.preprocess)
    print(result.summary())
    return 0


def add_demo(sub):
    p = sub.add_parser("demo", help="the whole path on this machine: train, convert, broker, cloud, device, 1,000 images "
                                    "(yours with --model my.keras --data D)")
    p.add_argument("--model", default="paper-cnn", help="zoo name or .keras file (default paper-cnn)")
    p.add_argument("--cut", default=None,
                   help="cut layer (default: pool2 for paper-cnn; for another model the fewest bytes sent with at "
                        "most half the compute on the device)")
    p.add_argument("--quant", choices=["int8", "float16", "dynamic", "none"], default="int8")
    p.add_argument("--n", type=int, default=1000, help="test images sent end to end (default 1000)")
    p.add_argument("--broker", default=None, metavar="URL",
                   help="use this broker (mqtt://host:port) instead of starting the embedded one")
    p.add_argument("--workers", type=int, default=1, help="cloud worker processes (default 1)")
    p.add_argument("--out", default="demo-out", help="where results go (default ./demo-out)")
    add_data_options(p)
    p.set_defaults(func=run_demo)


def run_demo(args) -> int:
    from edgesplit import demo

    result = demo.run_demo(model=args.model, cut=args.cut, quant=args.quant, n=args.n, broker=args.broker,
                           out=args.out, workers=args.workers, data=args.data, test_split=args.test_split,
                           data_seed=args.data_seed, preprocess=args.preprocess)
    print(result.summary())
    return 0


def add_broker(sub):
    p = sub.add_parser("broker", help="run an MQTT broker (embedded or Mosquitto), or write a production "
                                      "Mosquitto configuration (`broker config`)",
                       usage="%(prog)s [--host H] [--port P] [--mosquitto [--config DIR]] [--workdir DIR]\n"
                             "       %(prog)s --cluster N [--workdir DIR]\n"
                             "       %(prog)s config --out DIR (--devices N | --device ID [ID ...]) [...]",
                       description="Without an action: run a broker in the foreground until Ctrl+C — the embedded "
                                   "one (zero setup, loopback, anonymous), or a real Mosquitto with --mosquitto, "
                                   "optionally with a configuration written by `broker config` (--config DIR: its "
                                   "TLS listener, passwords and ACL). `broker config` writes that configuration.")
    # None = not given: a running broker defaults to 127.0.0.1:1883, --config decides for itself,
    # and `broker config` refuses them (it has its own --port/--bind)
    p.add_argument("--host", default=None,
                   help="address to bind (default 127.0.0.1; 0.0.0.0 opens an anonymous broker to the network)")
    p.add_argument("--port", type=int, default=None, help="MQTT port (default 1883; with --config: its listener's)")
    p.add_argument("--mosquitto", action="store_true",
                   help="run a real Mosquitto (apt-get install mosquitto) with a generated config")
    p.add_argument("--config", default=None, metavar="PATH",
                   help="with --mosquitto: a directory from `edgesplit broker config` (or a mosquitto.conf) "
                        "to run as is; port, address and TLS come from it")
    p.add_argument("--cluster", type=int, default=None, metavar="N",
                   help="run an N-node NATS cluster (JetStream and MQTT on every node, loopback, free ports) "
                        "for `edgesplit cloud --source nats://...`; it prints the URLs")
    p.add_argument("--workdir", default=None, metavar="DIR",
                   help="keep the generated config and the broker log here (default: a temporary directory)")
    p.set_defaults(func=run_broker)
    actions = p.add_subparsers(dest="broker_action", metavar="ACTION", required=False)
    c = actions.add_parser("config", prog="edgesplit broker config",
                           help="write a production Mosquitto configuration: TLS listener, hashed "
                                "passwords, per-device ACL, credentials to flash (docs/broker.md)",
                           description="Writes DIR/broker (mosquitto.conf, certificates, passwd, acl), DIR/ca, "
                                       "DIR/devices/<id> and DIR/cloud/<user>. Re-running keeps the CA, the "
                                       "certificate and every password; --rotate makes new ones. With --bridge "
                                       "URL: DIR/edge, an edge broker (a gateway, or the Pi itself) bridged to "
                                       "that cloud broker.")
    c.add_argument("--out", required=True, metavar="DIR", help="directory to write (re-run to add devices)")
    who = c.add_mutually_exclusive_group(required=False)     # one of them, unless --bridge
    who.add_argument("--devices", type=int, metavar="N", help="N devices named pi-001 ... pi-N")
    who.add_argument("--device", nargs="+", dest="device_ids", metavar="ID", help="devices by id")
    c.add_argument("--fleet", default="default", help="fleet id (default: default)")
    c.add_argument("--cloud-user", action="extend", nargs="+", dest="cloud_users", metavar="USER",
                   help="cloud worker user name(s) (default: cloud); repeatable")
    c.add_argument("--hostname", action="extend", nargs="+", dest="hostnames", metavar="NAME",
                   help="names/addresses devices dial, put in the server certificate (default: localhost); "
                        "the first goes into the devices' broker URL")
    c.add_argument("--port", type=int, default=None, dest="config_port", metavar="PORT",
                   help="TLS port (default 8883); with --bridge the edge broker's port for devices (default 1883)")
    c.add_argument("--bind", default=None, metavar="ADDR", help="listen on this address only (default: all)")
    c.add_argument("--tls-cert", default=None, metavar="PEM", help="your own server certificate (with --tls-key)")
    c.add_argument("--tls-key", default=None, metavar="PEM", help="its unencrypted private key")
    c.add_argument("--ca", default=None, metavar="PEM",
                   help="with --tls-cert: the CA clients should trust (default: their system trust store); "
                        "with --bridge: the CA of the cloud broker's certificate")
    c.add_argument("--operator", action="extend", nargs="+", dest="operators", metavar="USER",
                   help="the fleet operator's user: publishes bundle updates, reads every device's report "
                        "(default: operator; docs/fleet.md)")
    c.add_argument("--gateway", action="extend", nargs="+", dest="gateways", metavar="NAME",
                   help="a user for an edge broker's bridge (writes the fleet's features and status, reads its "
                        "results); with --bridge: this bridge's name (default: the URL's user)")
    c.add_argument("--bridge", default=None, metavar="URL",
                   help="write an edge broker (a gateway, or the Pi itself) bridged to this cloud broker, e.g. "
                        "mqtts://gw-01@broker.example:8883: devices publish to it, features and status go to the "
                        "cloud, results come back, a local queue rides out WAN cuts (docs/broker.md, 'At the edge')")
    c.add_argument("--password-file", default=None, metavar="FILE",
                   help="with --bridge: the bridge's password for the cloud broker (first line)")
    c.add_argument("--broker-dir", default=None, metavar="DIR",
                   help="where the broker files will live on the broker host (paths in mosquitto.conf)")
    c.add_argument("--rotate", action="store_true", help="new CA, certificate and passwords for everyone")
    c.set_defaults(func=run_broker_config)


def run_broker(args) -> int:
    from deploy import broker

    if args.cluster is not None:
        from deploy import cluster
        from protocol.errors import UsageError

        given = [f for f, v in (("--port", args.port), ("--mosquitto", args.mosquitto), ("--config", args.config)) if v]
        if given:
            raise UsageError(f"{', '.join(given)} cannot go with --cluster",
                             fix="--cluster picks free ports for every node and prints them; drop the others")
        print(cluster.serve(args.cluster, args.host, workdir=args.workdir).summary())
        return 0

    result = broker.serve(args.host, args.port, mosquitto=args.mosquitto, config=args.config,
                          workdir=args.workdir)
    print(result.summary())
    return 0


def run_broker_config(args) -> int:
    from deploy import broker
    from protocol.errors import UsageError

    given = [flag for flag, value in (("--host", args.host), ("--port", args.port), ("--mosquitto", args.mosquitto),
                                      ("--config", args.config), ("--workdir", args.workdir),
                                      ("--cluster", args.cluster)) if value]
    if given:
        raise UsageError(f"{', '.join(given)} {'is' if len(given) == 1 else 'are'} for running a broker; "
                         "`edgesplit broker config` only writes a configuration",
                         fix="write it with `edgesplit broker config --out DIR ... [--port 8883] [--bind ADDR]`, "
                             "then run it with `edgesplit broker --mosquitto --config DIR`")
    result = broker.configure(args.out, devices=args.devices, device_ids=args.device_ids, fleet=args.fleet,
                              cloud_users=args.cloud_users, hostnames=args.hostnames, port=args.config_port,
                              bind=args.bind, tls_cert=args.tls_cert, tls_key=args.tls_key, ca=args.ca,
                              broker_dir=args.broker_dir, rotate=args.rotate, gateways=args.gateways,
                              bridge=args.bridge, password_file=args.password_file, operators=args.operators)
    print(result.summary())
    return 0


def add_device(sub):
    from device.config import DEFAULT_CONFIG
    from device.flags import flags

    p = sub.add_parser("device", help="the device role: run a bundle's head and send features to the cloud")
    dsub = p.add_subparsers(dest="device_verb", metavar="ACTION")
    dsub.required = True
    r = dsub.add_parser("run", help="send images (files, folders, globs, 'camera[:N]') and print one JSON "
                                    "line per result; a summary goes to stderr")
    r.add_argument("inputs", nargs="*", metavar="INPUT",
                   help="image file, folder, glob such as 'imgs/*.png', or camera / camera:N (picamera2); "
                        "none with --outbox: only re-send what the outbox holds")
    # every other option is a setting of device.config.DeviceConfig, described there once
    for flag, name, s, default in flags():
        shown = f" (default {default:g})" if isinstance(default, float) else \
            f" (default {default})" if default not in ("", None) else ""
        r.add_argument(flag, dest=name, default=None, type={"int": int, "float": float}.get(s.kind, str),
                       metavar=s.metavar, choices=[c for c in s.choices if c] or None,
                       required=name == "bundle",          # the only setting nothing else can supply
                       help=s.doc + shown)
    r.add_argument("--stats-json", default=None, metavar="FILE",
                   help="also write the run's counters and latency percentiles as JSON to FILE")
    r.set_defaults(func=run_device)
    v = dsub.add_parser("serve", help="the device service (what edgesplit-device.service runs): watch the "
                                      "configured inputs and send them until stopped",
                        description="Reads the device config (docs/deploy.md), talks to systemd (Type=notify, "
                                    "watchdog) and exits 0 after a clean stop, 78 on a configuration it "
                                    "cannot run with (systemd then leaves it stopped).")
    v.add_argument("--config", default=os.environ.get("EDGESPLIT_CONFIG", DEFAULT_CONFIG), metavar="FILE",
                   help=f"device configuration file (default {DEFAULT_CONFIG}, or $EDGESPLIT_CONFIG)")
    v.add_argument("--check", action="store_true",
                   help="validate the configuration and credentials, print them, and exit (0 or 78)")
    v.set_defaults(func=run_device_serve, log_format="service")


def run_device(args) -> int:
    # Only device/, runtime/ and protocol/ are imported here: a Raspberry Pi has no TensorFlow.
    from device import flags, run

    cfg = flags.from_flags({name: getattr(args, name) for _, name, _, _ in flags.flags()}
                           | {"sources": args.inputs})
    summary = run.run(cfg, on_result=lambda r: print(r.to_json(), flush=True))
    print(summary.summary(), file=sys.stderr)
    if args.stats_json:
        with open(args.stats_json, "w") as fh:
            json.dump(summary.to_dict(), fh, indent=2)
    return summary.exit_code


def run_device_serve(args) -> int:
    from device import service

    if args.check:
        print(service.check(args.config))
        return 0
    return service.serve(args.config)


def add_flash(sub):
    p = sub.add_parser("flash", help="prepare a Raspberry Pi OS image so its first boot installs the device package",
                       description="Writes into the boot (FAT) partition of a Raspberry Pi OS .img what first "
                                   "boot needs: cloud-init user-data/network-config or firstrun.sh (detected), "
                                   "and the device package with a one-shot unit that installs it. "
                                   "Then write the image to the SD card as usual.")
    p.add_argument("image", help="Raspberry Pi OS .img (decompressed); a block device only with --i-know")
    p.add_argument("--device-package", required=True, metavar="TAR_GZ",
                   help="the device package (from `edgesplit bundle device`)")
    p.add_argument("--wifi-ssid", default=None, metavar="SSID", help="Wi-Fi network to join")
    p.add_argument("--wifi-psk-file", default=None, metavar="FILE",
                   help="file holding the Wi-Fi passphrase (never given on the command line; it is hashed)")
    p.add_argument("--wifi-country", default=None, metavar="CC",
                   help="two-letter country code for the Wi-Fi regulatory domain, e.g. GB, US, DE")
    p.add_argument("--hostname", default=None, help="host name of the device, e.g. pi-001")
    p.add_argument("--ssh-key", default=None, metavar="PUBKEY",
                   help="public key file (e.g. ~/.ssh/id_ed25519.pub): turns SSH on, key only")
    p.add_argument("--user", default="pi", help="login user for --ssh-key (default pi)")
    p.add_argument("--method", choices=["auto", "cloud-init", "firstrun"], default="auto",
                   help="first-boot mechanism (default: detect from the image)")
    p.add_argument("--i-know", action="store_true",
                   help="allow writing to a block device (an SD card), not just an image file")
    p.set_defaults(func=run_flash)


def run_flash(args) -> int:
    from deploy import flash

    result = flash.flash(args.image, args.device_package, wifi_ssid=args.wifi_ssid,
                         wifi_psk_file=args.wifi_psk_file, wifi_country=args.wifi_country,
                         hostname=args.hostname, ssh_key=args.ssh_key, username=args.user,
                         method=args.method, i_know=args.i_know)
    print(result.summary())
    return 0


def add_cloud(sub):
    p = sub.add_parser("cloud", help="run cloud workers: receive feature frames, run the tail, answer")
    p.add_argument("--bundle", default=[], nargs="+", metavar="B",
                   help="bundle directories or .tar.gz files to serve (frames name their bundle by id); with "
                        "--fleet-key also those the fleet's operator announces")
    p.add_argument("--broker", required=True, metavar="URL",
                   help="the MQTT broker answers go to (and, without --source, frames come from): "
                        "mqtt://host:port or mqtts://user:pass@host:8883")
    p.add_argument("--source", default=None, metavar="URL",
                   help="where frames come from: the broker's shared subscription (default, or the same mqtt:// "
                        "URL), or nats://host:port[,host:port...] for a JetStream work queue on a NATS cluster "
                        "(edgesplit broker --cluster 3; options in docs/broker.md)")
    p.add_argument("--password-file", default=None, metavar="FILE",
                   help="read the broker password from FILE (first line) instead of the URL, so it never shows "
                        "in the process list; e.g. $CREDENTIALS_DIRECTORY/broker-password under systemd")
    p.add_argument("--workers", type=int, default=1, help="worker processes on one source (default 1)")
    p.add_argument("--group", default="edgesplit", help="shared-subscription group (default edgesplit)")
    p.add_argument("--fleet", default="+", help="serve only this fleet (default: every fleet)")
    p.add_argument("--max-batch", type=int, default=32, help="most frames per tail run (default 32)")
    p.add_argument("--max-wait-ms", type=float, default=0.0,
                   help="how long the first frame of a batch waits for others (default 0: a batch is what "
                        "queued while the last one ran)")
    p.add_argument("--threads", type=int, default=None, help="interpreter threads per worker (default: LiteRT's)")
    p.add_argument("--stats-every", type=float, default=30.0, metavar="S",
                   help="log a stats line every S seconds (default 30; 0: only at exit)")
    p.add_argument("--keys", default=None, nargs="+", metavar="PATH",
                   help="directory of <device-id>.key files (or such files): require a valid MAC on every "
                        "frame, refuse unknown devices and replays")
    p.add_argument("--replay-window", type=float, default=120.0, metavar="S",
                   help="with --keys: refuse frames sent more than S seconds from now, and repeats (default 120)")
    p.add_argument("--fleet-key", default=None, metavar="PUB",
                   help="the fleet's public key (fleet.pub from `edgesplit broker config`): load the tails of "
                        "announced bundles without a restart (docs/fleet.md)")
    p.add_argument("--bundle-cache", default=None, metavar="DIR",
                   help="with --fleet-key: where announced bundles are unpacked (default "
                        "$EDGESPLIT_CACHE/cloud-bundles, else ~/.cache/edgesplit/cloud-bundles)")
    p.add_argument("--tail-idle", type=float, default=3600.0, metavar="S",
                   help="with --fleet-key: drop a tail no frame has named for S seconds (default 3600)")
    p.add_argument("--metrics-port", type=int, default=0, metavar="PORT",
                   help="serve Prometheus metrics on PORT (worker i of --workers on PORT + i; default 0: off)")
    p.add_argument("--metrics-host", default="127.0.0.1", metavar="ADDR",
                   help="address of the metrics port (default 127.0.0.1)")
    p.add_argument("--json", action="store_true", help="print the counters at exit as JSON instead of a summary")
    p.set_defaults(func=run_cloud)


def run_cloud(args) -> int:
    from cloud import worker

    from protocol.mqtt import read_password_file

    password = read_password_file(args.password_file) if args.password_file else None
    follow = None
    if args.fleet_key:
        cache = args.bundle_cache or os.path.join(os.environ.get("EDGESPLIT_CACHE") or
                                                  os.path.expanduser("~/.cache/edgesplit"), "cloud-bundles")
        follow = dict(keys=args.fleet_key, cache_dir=cache, idle_s=args.tail_idle)
    result = worker.serve(args.bundle, args.broker, workers=args.workers, group=args.group, fleet=args.fleet,
                          max_batch=args.max_batch, max_wait_ms=args.max_wait_ms, stats_every=args.stats_every,
                          num_threads=args.threads, keys=args.keys, replay_window_s=args.replay_window,
                          password=password, source=args.source, follow=follow,
                          metrics=(args.metrics_host, args.metrics_port) if args.metrics_port else None)
    print(json.dumps(result.to_dict(), indent=2) if args.json else result.summary())
    return 0


def add_audit(sub):
    p = sub.add_parser("audit", help="measure, cut by cut, how much of the input the sent features leak; "
                                     "write report.html/.json/.md")
    p.add_argument("target", metavar="MODEL|BUNDLE",
                   help="zoo name (e.g. paper-cnn), a .keras file, or a bundle directory / .tar.gz")
    p.add_argument("--cuts", nargs="+", default=None, metavar="LAYER",
                   help="layers to audit (default: every valid cut; see `edgesplit cuts MODEL`)")
    p.add_argument("--n", type=int, default=None, help="test images for the information measures (default 1000)")
    p.add_argument("--preset", choices=["paper"], default=None,
                   help="paper: Tuor et al.'s setting (10,000 test images, sigma^2 = 0.1, all six layers)")
    p.add_argument("--seed", type=int, default=None, help="makes a run repeatable (default 0)")
    p.add_argument("--max-bytes", type=int, default=None, help="budget: bytes sent per input (int8)")
    p.add_argument("--max-head-ms", type=float, default=None, help="budget: head latency in ms on this machine")
    p.add_argument("--min-accuracy", type=float, default=None, help="budget: head+tail accuracy, e.g. 0.98")
    p.add_argument("--iters", type=int, default=None, help="white-box inversion iterations (default 300)")
    p.add_argument("--attack-n", type=int, default=None, help="test images attacked by white-box inversion")
    p.add_argument("--decoder-epochs", type=int, default=None, help="epochs of the learned decoder (default 5)")
    p.add_argument("--sigma2", type=float, default=None, help="KDE noise variance (default 0.1)")
    p.add_argument("--no-sigma-sweep", dest="sigma_sweep", action="store_false", default=None,
                   help="skip the KDE bounds over a grid of sigma^2 (one full pairwise pass per cut: minutes at "
                        "N = 10,000)")
    p.add_argument("--attacks", nargs="+", default=None, metavar="ATTACK",
                   help="attacks to run, by what the attacker knows: whitebox (the head's weights), decoder (query "
                        "access), architecture (the layers only, UnSplit), queryfree (the tail and own data); "
                        "default all four (the label-only baselines always run)")
    p.add_argument("--aux-budgets", nargs="+", type=int, default=None, metavar="N",
                   help="the query decoder's auxiliary images, a sweep (default 100 1000 10000, capped at what the "
                        "attacker has)")
    p.add_argument("--decoder-n", type=int, default=None,
                   help="the attacker's own images (training set; default 5000)")
    p.add_argument("--hardened", nargs="+", default=None, metavar="DIR",
                   help="`edgesplit harden --out` directories (or hardened bundles) to attack beside their cut")
    p.add_argument("--out", required=True, help="directory for report.html, report.json, report.md")
    p.add_argument("--model", default=None, metavar="FILE", dest="model_file",
                   help="auditing a bundle: the .keras file it was made from (default: the file its manifest "
                        "names, found where it was or beside the bundle; or its zoo name)")
    p.add_argument("--calibration", type=int, default=None, metavar="N",
                   help="training images calibrating the int8 bundles made for the audit (default 500, or all)")
    add_data_options(p)
    p.set_defaults(func=run_audit)


def run_audit(args) -> int:
    from auditor.audit import audit

    result = audit(args.target, cuts=args.cuts, n=args.n, preset=args.preset, seed=args.seed, out=args.out,
                   progress=True, max_bytes=args.max_bytes, max_head_ms=args.max_head_ms,
                   min_accuracy=args.min_accuracy, iters=args.iters, attack_n=args.attack_n,
                   decoder_epochs=args.decoder_epochs, sigma2=args.sigma2,
                   sigma_sweep=args.sigma_sweep, data=args.data, test_split=args.test_split,
                   data_seed=args.data_seed, preprocess=args.preprocess, model_file=args.model_file,
                   calibration=args.calibration, attacks=args.attacks, aux_budgets=args.aux_budgets,
                   decoder_n=args.decoder_n, hardened=args.hardened)
    print(result.summary())
    return 0


def add_iplane(sub):
    p = sub.add_parser("iplane", help="train a model while recording I(X;T), I(Y;T) of every layer: the "
                                      "information plane over training (Saxe et al.; Tuor et al.'s Fig. 5)",
                       description="Presets: saxe-tanh, saxe-relu (ibsgd's settings: 10,000 epochs, about 11 h of "
                                   "training on 2 cores), saxe-tanh-short, saxe-relu-short (100 epochs at lr 0.1, "
                                   "the same lr x steps), or any zoo model (its recipe, every cut). Ctrl+C stops "
                                   "after the current step with a snapshot; --resume continues it.")
    p.add_argument("target", metavar="PRESET|MODEL", help="saxe-tanh, saxe-relu, saxe-tanh-short, saxe-relu-short, "
                                                          "or a zoo name (e.g. paper-cnn)")
    p.add_argument("--out", required=True, help="directory for iplane.html/.json/.md, figures and the snapshot")
    p.add_argument("--resume", action="store_true", help="continue the run whose snapshot is in --out")
    p.add_argument("--epochs", type=int, default=None, help="override the preset's epochs")
    p.add_argument("--lr", type=float, default=None, help="override the learning rate")
    p.add_argument("--n", type=int, default=None, help="test images the information is measured on")
    p.add_argument("--sigma2", type=float, default=None, help="KDE noise variance (default 0.1)")
    p.add_argument("--grid", default=None, help="recorded steps: 'ibsgd' (its epochs) or 'log:K'")
    p.add_argument("--seed", type=int, default=None, help="makes a run repeatable (default 0)")
    p.set_defaults(func=run_iplane)


def run_iplane(args) -> int:
    from auditor import dynamics

    spec = dynamics.DynamicsSpec.make(args.target, out=args.out, resume=args.resume, epochs=args.epochs, lr=args.lr,
                                      n=args.n, sigma2=args.sigma2, grid=args.grid, seed=args.seed)
    try:
        result = dynamics.run(spec)
    except dynamics.Stopped as stopped:
        print(stopped.result.summary(), file=sys.stderr)
        import shlex

        given = [(f"--{k.replace('_', '-')}", v) for k, v in vars(args).items()
                 if k in ("epochs", "lr", "n", "sigma2", "grid", "seed") and v is not None]
        again = shlex.join(["edgesplit", "iplane", args.target, "--out", args.out]
                           + [str(x) for pair in given for x in pair] + ["--resume"])
        print(f"edgesplit iplane: {stopped.why}\n  resume with: {again}", file=sys.stderr)
        return stopped.exit_code
    print(result.summary())
    return 0


def add_harden(sub):
    p = sub.add_parser("harden", help="fine-tune a defence at a cut (noise, dropout, NoPeek, VIB, adversarial), "
                                      "write the hardened .keras and its int8 bundle, attack it; or --sweep them",
                       description="Fine-tunes MODEL with a defence at --cut; what must happen at inference (noise, "
                                   "a dropout mask) is declared in the bundle's manifest and applied on the device, "
                                   "fresh for every input. Writes OUT/model.keras, OUT/bundle (+ .tar.gz) and "
                                   "OUT/harden.json; with --sweep every method (or --method) at four strengths, "
                                   "OUT/sweep.json/.md, and the point chosen under the budgets.")
    p.add_argument("model", help="zoo name (e.g. paper-cnn) or a .keras file (the plain, trained model)")
    p.add_argument("--cut", required=True, help="layer whose output is sent (see `edgesplit cuts MODEL`)")
    p.add_argument("--method", default=None, metavar="M",
                   help="noise, dropout, nopeek, vib or adversarial (with --sweep: only this one)")
    how = p.add_mutually_exclusive_group()
    how.add_argument("--strength", type=float, default=None, metavar="S",
                     help="the method's strength (default: its own); noise: std in units of the features' RMS; "
                          "dropout: drop rate; nopeek: dCor weight; vib: beta; adversarial: decoder-loss weight")
    how.add_argument("--sweep", action="store_true", help="try four strengths of every method (or of --method)")
    p.add_argument("--strengths", default=None, metavar="S,S,..", help="with --sweep and --method: these strengths")
    p.add_argument("--noise", choices=["gaussian", "laplace"], default="gaussian", help="noise: its distribution")
    p.add_argument("--learned", action="store_true", help="noise: learn its scale per channel (Shredder)")
    p.add_argument("--data", default=None, metavar="SPEC",
                   help="the user's images (default: the zoo model's data, or MNIST for an MNIST-shaped model)")
    p.add_argument("--min-accuracy", type=float, default=None,
                   help="budget: int8 split accuracy (default: the unhardened one minus 1 percentage point)")
    p.add_argument("--max-psnr", type=float, default=None, help="budget: PSNR (dB) of the strongest attack")
    p.add_argument("--steps", type=int, default=None, help="fine-tuning steps per point (default 400)")
    p.add_argument("--lr", type=float, default=None, help="peak fine-tuning learning rate (default 1e-3)")
    p.add_argument("--test-n", type=int, default=None, help="test images for the int8 accuracy (default 2000)")
    p.add_argument("--victims", type=int, default=None, help="test images the attacks reconstruct (default 200)")
    p.add_argument("--no-attacks", action="store_true", help="harden and convert only (no attack figures)")
    p.add_argument("--seed", type=int, default=None, help="makes a run repeatable (default 0)")
    p.add_argument("--out", required=True, metavar="DIR", help="directory for the hardened model, bundle and results")
    p.set_defaults(func=run_harden)


def run_harden(args) -> int:
    from auditor.defences.harden import harden
    from auditor.defences.points import settings_from

    result = harden(args.model, args.cut, args.method, args.strength, sweep=args.sweep, strengths=args.strengths,
                    data=args.data, out=args.out, min_accuracy=args.min_accuracy, max_psnr=args.max_psnr,
                    noise=args.noise, learned=args.learned,
                    settings=settings_from(steps=args.steps, lr=args.lr, test_n=args.test_n, victims=args.victims,
                                           attacks=not args.no_attacks, seed=args.seed))
    print(result.summary())
    return 0


def add_bundle(sub):
    p = sub.add_parser("bundle", help="package a bundle for a target: `edgesplit bundle device` makes a Raspberry "
                                      "Pi device package")
    bsub = p.add_subparsers(dest="bundle_verb", metavar="TARGET")
    bsub.required = True
    d = bsub.add_parser("device", help="a self-contained device package (.tar.gz): bundle, config, credentials, "
                                       "the edgesplit wheel, install.sh and a systemd unit",
                        description="Makes a tarball that installs the edgesplit device service on 64-bit "
                                    "Raspberry Pi OS (Bookworm or newer): unpack it on the Pi and run "
                                    "`sudo ./install.sh`, or hand it to `edgesplit flash`.")
    d.add_argument("--bundle", required=True, help="bundle directory or .tar.gz (from `edgesplit convert`)")
    d.add_argument("--out", required=True, metavar="TAR_GZ", help="the package to write, e.g. pi-001.tar.gz")
    d.add_argument("--config", default=None, metavar="FILE",
                   help="a device config (TOML or JSON) to start from; flags below override its values")
    d.add_argument("--broker", default=None, metavar="URL",
                   help="broker URL, e.g. mqtts://broker.example.org:8883 (default: from --credentials)")
    d.add_argument("--device-id", default=None, help="device id (default: from --credentials)")
    d.add_argument("--fleet", default=None, help="fleet id (default: from --credentials, else 'default')")
    d.add_argument("--credentials", default=None, metavar="DIR",
                   help="the device's directory from `edgesplit broker config` (devices/<id>/: broker.json, "
                        "password, ca.crt), or that command's --out directory together with --device-id")
    d.add_argument("--key", default=None, metavar="FILE", help="the device's frame MAC key (signed frames)")
    d.add_argument("--inputs", nargs="+", default=None, metavar="INPUT",
                   help="what the device reads: folders (watched for new images), globs, 'camera' "
                        "(default: the folder /var/lib/edgesplit/inbox)")
    d.add_argument("--offline-wheels", action="store_true",
                   help="ship every dependency as a wheel for the target, so install.sh needs no network")
    d.add_argument("--wheel-platform", default="aarch64", metavar="PLATFORM",
                   help="with --offline-wheels: aarch64 (64-bit Raspberry Pi OS, default), x86_64, native "
                        "(this machine), or a pip platform tag")
    d.add_argument("--python-version", default="3.11", metavar="X.Y",
                   help="with --offline-wheels: the target's Python (3.11 Bookworm, default; 3.13 Trixie)")
    d.add_argument("--interpreter", choices=["auto", "ai-edge-litert", "tflite-runtime"], default="auto",
                   help="TFLite interpreter to install (auto: ai-edge-litert, tflite-runtime if it cannot be had)")
    d.add_argument("--constraint", action="append", default=[], metavar="SPEC",
                   help="extra pip constraint for the device, e.g. 'numpy<2' (repeatable)")
    d.set_defaults(func=run_bundle)


def run_bundle(args) -> int:
    from deploy import device_package

    result = device_package.build_device_package(
        args.bundle, args.out, config=args.config, broker=args.broker, device_id=args.device_id,
        fleet=args.fleet, credentials=args.credentials, key=args.key, inputs=args.inputs,
        offline_wheels=args.offline_wheels, wheel_platform=args.wheel_platform,
        python_version=args.python_version, interpreter=args.interpreter, constraints=args.constraint)
    print(result.summary())
    return 0


def add_doctor(sub):
    p = sub.add_parser("doctor", help="check this machine can run the device: Python, interpreter, packages, "
                                      "camera, bundle, credentials, broker",
                       description="Prints ok / FAIL / skip for each check and the command that fixes what "
                                   "failed; exits 0 when nothing failed. On a device with no arguments it "
                                   "checks the installed /etc/edgesplit/device.toml.")
    p.add_argument("--bundle", default=None, help="bundle directory or .tar.gz to verify and load")
    p.add_argument("--broker", default=None, metavar="URL", help="broker to connect to (mqtt://, mqtts://)")
    p.add_argument("--config", default=None, metavar="FILE",
                   help="device config: its bundle, broker and credentials are checked")
    p.add_argument("--timeout", type=float, default=5.0, metavar="S", help="broker connect timeout (default 5 s)")
    p.add_argument("--skip", action="append", default=[], metavar="CHECK",
                   help="do not run this check (repeatable), e.g. --skip broker while offline")
    p.add_argument("--json", action="store_true", help="print JSON instead of the report")
    p.set_defaults(func=run_doctor)


def run_doctor(args) -> int:
    # Only device/ and protocol/ are imported: the doctor runs on the Pi.
    from device import doctor

    report = doctor.run_doctor(args.bundle, args.broker, args.config, timeout=args.timeout, skip=args.skip)
    print(json.dumps(report.to_dict(), indent=2) if args.json else report.summary())
    return report.exit_code


def add_profile(sub):
    p = sub.add_parser("profile", help="time a bundle's head (and tail) on THIS machine with the real interpreter "
                                       "and write a profile for `edgesplit plan` (run it on the device)",
                       description="Runs on the device (no TensorFlow needed): times one input at a time through "
                                   "each bundle's head and tail, records the bytes of the frames it would send, "
                                   "and writes a JSON profile for `edgesplit plan --device-profile FILE` (on the "
                                   "cloud machine: --cloud-profile).")
    p.add_argument("--bundle", required=True, nargs="+", action="extend", metavar="B",
                   help="bundle directories or .tar.gz (one per cut to profile; repeatable)")
    p.add_argument("--out", default="edgesplit-profile.json", metavar="FILE",
                   help="profile file to write (default ./edgesplit-profile.json)")
    p.add_argument("--runs", type=int, default=200, metavar="N", help="timed runs per model (default 200)")
    p.add_argument("--warmup", type=int, default=10, metavar="N", help="untimed runs first (default 10)")
    p.add_argument("--threads", type=int, default=1, metavar="N", help="interpreter threads (default 1)")
    p.add_argument("--part", choices=["head", "tail", "both"], default="both",
                   help="what to time: head (device), tail (cloud) or both (default; head + tail is also the "
                        "whole model on this machine)")
    p.add_argument("--inputs", nargs="+", default=None, metavar="IMAGE",
                   help="real images (files, folders, globs) to time and to measure the frame bytes as sent "
                        "(compressed when it pays); default: a random input, uncompressed frame size")
    p.add_argument("--interpreter", choices=["ai_edge_litert", "tflite_runtime", "tensorflow"], default=None,
                   help="force one TFLite interpreter (default: the first installed)")
    p.add_argument("--json", action="store_true", help="print the profile as JSON instead of a table")
    add_data_options(p, preprocess=False)
    p.set_defaults(func=run_profile)


def profile_inputs(args):
    """--inputs as given, or the --data images (a folder as the device reads it, an .npz's test arrays)."""
    if args.data is None:
        if args.test_split is not None:
            from protocol.errors import UsageError

            raise UsageError("--test-split only applies to --data images", fix="give --data, or drop --test-split")
        return args.inputs
    from protocol.errors import UsageError

    if args.inputs:
        raise UsageError("--inputs and --data both name the images to time", fix="give one of them")
    # converter.userdata needs no TensorFlow: this still runs on the Pi
    from converter.userdata import load_data

    images = load_data(args.data, test_split=args.test_split, seed=args.data_seed)   # checks the data
    # a folder's images are read as the device reads a folder (the profile names the folder); an .npz's test arrays
    return [str(args.data)] if images.files else images.test.items[:200]


def run_profile(args) -> int:
    # Only device/, runtime/, protocol/ (and TensorFlow-free converter.userdata) are imported: this runs on the Pi.
    from device import profile

    result = profile.run(args.bundle, out=args.out, runs=args.runs, warmup=args.warmup, threads=args.threads,
                         part=args.part, inputs=profile_inputs(args), interpreter=args.interpreter)
    print(json.dumps(result.to_dict(), indent=2) if args.json else result.summary())
    return 0


def add_plan(sub):
    p = sub.add_parser("plan", help="rank every cut, all-on-device and raw-to-cloud by predicted end-to-end "
                                    "latency on your link, with leakage beside, and pick one",
                       description="Predicted latency = head on the device + transfer (frame bytes with MQTT and "
                                   "TCP/IP overhead at the uplink rate) + RTT + tail in the cloud (+ batch wait) + "
                                   "result back. Give an audit report.json to see leakage and use --max-leakage.")
    p.add_argument("source", metavar="MODEL|AUDIT_REPORT",
                   help="report.json from `edgesplit audit` (or its directory), a zoo name or a .keras file")
    p.add_argument("--uplink", required=True, metavar="RATE", help="device -> broker rate, e.g. 1mbit, 20Mbit, 500kbit")
    p.add_argument("--rtt", required=True, metavar="TIME", help="round-trip time device <-> broker, e.g. 40ms, 0.04s")
    p.add_argument("--downlink", default=None, metavar="RATE", help="broker -> device rate (default: the uplink's)")
    p.add_argument("--device-profile", default=None, metavar="FILE",
                   help="from `edgesplit profile` on the device (default: the report's timings)")
    p.add_argument("--cloud-profile", default=None, metavar="FILE",
                   help="from `edgesplit profile` on the cloud machine (tail times; head + tail for raw images)")
    p.add_argument("--max-leakage", type=float, default=None, metavar="DB",
                   help="most leakage allowed: PSNR in dB of the strongest reconstruction attack (needs a report)")
    p.add_argument("--max-latency-ms", type=float, default=None, metavar="MS", help="most predicted latency allowed")
    p.add_argument("--objective", choices=["latency", "leakage"], default="latency",
                   help="within the limits pick the fastest (default) or the least leaking option")
    p.add_argument("--exclude", nargs="+", action="extend", default=[], metavar="OPTION",
                   help="options not to pick, e.g. device (the model does not fit) or raw")
    p.add_argument("--burst", default="0", metavar="BYTES",
                   help="bytes a token-bucket shaper sends at line rate when idle (e.g. tc tbf burst; default 0)")
    p.add_argument("--hop-ms", type=float, default=None, metavar="MS",
                   help="MQTT client + broker work per hop (4 hops per request; default 0.5)")
    p.add_argument("--cloud-wait-ms", type=float, default=None, metavar="MS",
                   help="the cloud worker's micro-batch wait (its --max-wait-ms; default 0)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    add_data_options(p, preprocess=False)
    p.set_defaults(func=run_plan)


def run_plan(args) -> int:
    from converter import planner

    extra = {k: v for k, v in (("hop_ms", args.hop_ms), ("cloud_wait_ms", args.cloud_wait_ms)) if v is not None}
    result = planner.plan(args.source, uplink=args.uplink, rtt=args.rtt, downlink=args.downlink,
                          device_profile=args.device_profile, cloud_profile=args.cloud_profile,
                          max_leakage_db=args.max_leakage, max_latency_ms=args.max_latency_ms, burst=args.burst,
                          objective=args.objective, exclude=args.exclude, data=args.data,
                          test_split=args.test_split, data_seed=args.data_seed, **extra)
    print(json.dumps(result.to_dict(), indent=2) if args.json else result.summary())
    return 0


def add_fleet(sub):
    p = sub.add_parser("fleet", help="publish a bundle to a fleet over MQTT (signed, canaries first), roll back, "
                                     "watch the fleet (docs/fleet.md)")
    fsub = p.add_subparsers(dest="fleet_verb", metavar="ACTION")
    fsub.required = True

    def access(q):
        q.add_argument("--fleet", required=True, help="the fleet id")
        q.add_argument("--config", default=None, metavar="SITE",
                       help="the --out directory of `edgesplit broker config`: its operator user and signing key")
        q.add_argument("--broker", default=None, metavar="URL", help="the broker (default: SITE's)")
        q.add_argument("--credentials", default=None, metavar="DIR",
                       help="the operator's directory (SITE/operator/<user>/: broker.json, password, ca.crt)")
        q.add_argument("--key", default=None, metavar="FILE", help="the fleet's signing key (SITE/fleet/fleet.key)")

    q = fsub.add_parser("publish", help="announce a bundle: the whole fleet, some devices, or canaries first")
    q.add_argument("bundle", metavar="BUNDLE", help="bundle directory or .tar.gz (from `edgesplit convert`)")
    access(q)
    who = q.add_mutually_exclusive_group()
    who.add_argument("--devices", nargs="+", default=None, metavar="ID", help="announce to these devices only")
    who.add_argument("--canary", type=int, default=None, metavar="N",
                     help="announce to N online devices first; go on to the fleet once they are healthy")
    q.add_argument("--url", default=None, metavar="URL",
                   help="the devices fetch the .tar.gz from this http(s):// or file:// URL instead of MQTT chunks")
    q.add_argument("--chunk-size", type=int, default=64 * 1024, metavar="BYTES", help="MQTT chunk size (64 KiB)")
    q.add_argument("--max-error-rate", type=float, default=0.05, metavar="F",
                   help="halt when a canary's errors exceed this fraction of its requests (default 0.05)")
    q.add_argument("--soak", type=float, default=30.0, metavar="S",
                   help="seconds a healthy canary is watched before the fleet follows (default 30)")
    q.add_argument("--timeout", type=float, default=900.0, metavar="S", help="give up waiting after S s (900)")
    q.add_argument("--no-wait", action="store_true", help="announce and return; do not wait for the devices")
    q.set_defaults(func=run_fleet)
    q = fsub.add_parser("rollback", help="return every device to the bundle before the newest announcement")
    access(q)
    q.add_argument("--timeout", type=float, default=300.0, metavar="S", help="give up waiting after S s (300)")
    q.add_argument("--no-wait", action="store_true", help="announce and return")
    q.set_defaults(func=run_fleet)
    q = fsub.add_parser("status", help="the fleet's table: availability, bundle, update state, last seen, outbox, "
                                       "requests/s, p95 latency, errors")
    access(q)
    q.add_argument("--watch", type=float, default=0.0, metavar="S", help="print it again every S seconds")
    q.add_argument("--json", action="store_true", help="print JSON instead of the table")
    q.set_defaults(func=run_fleet)


def run_fleet(args) -> int:
    from deploy import fleet

    access = fleet.FleetAccess.find(config=args.config, broker=args.broker, credentials=args.credentials,
                                    key=args.key)
    if args.fleet_verb == "status":
        fleet.status(args.fleet, access, watch=args.watch, as_json=args.json)
        return 0
    if args.fleet_verb == "rollback":
        result = fleet.rollback(args.fleet, access, timeout_s=args.timeout, wait=not args.no_wait)
    else:
        result = fleet.publish(args.bundle, args.fleet, access, devices=args.devices, canary=args.canary,
                               url=args.url, chunk_size=args.chunk_size, max_error_rate=args.max_error_rate,
                               soak_s=args.soak, timeout_s=args.timeout, wait=not args.no_wait)
    print(result.table)
    if not result.ok:
        print(f"edgesplit fleet {args.fleet_verb}: {result.halted}", file=sys.stderr)
        return 1
    return 0


VERBS = [add_train, add_cuts, add_convert, add_demo, add_broker, add_device, add_flash, add_cloud, add_audit, add_iplane,
         add_harden, add_bundle, add_doctor, add_profile, add_plan, add_fleet]


class _Subparsers(argparse._SubParsersAction):
    """Every verb (and sub-verb) also takes ``-v`` after its name: ``edgesplit device serve -v``."""

    def add_parser(self, name, **kwargs):
        p = super().add_parser(name, **kwargs)
        # SUPPRESS: a verb that is not given -v leaves the top level's value alone
        p.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                       help="debug logging and full tracebacks")
        p.register("action", "parsers", _Subparsers)
        return p


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edgesplit",
        description="Split inference at the edge: cut a Keras model, run the head on a device, "
                    "the tail in the cloud, over MQTT; audit what each cut leaks.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging and full tracebacks")
    parser.register("action", "parsers", _Subparsers)
    sub = parser.add_subparsers(dest="verb", metavar="VERB")
    sub.required = True
    for add in VERBS:
        add(sub)
    return parser


def _log_format(args) -> str:
    if getattr(args, "log_format", None) == "service":
        # journald adds time stamps; a terminal gets them too when not under systemd
        under_systemd = os.environ.get("INVOCATION_ID") or os.environ.get("JOURNAL_STREAM")
        return "%(levelname)s %(name)s: %(message)s" if under_systemd else \
            "%(asctime)s %(levelname)s %(name)s: %(message)s"
    return "%(levelname)s %(name)s: %(message)s" if args.verbose else "%(message)s"


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format=_log_format(args),
                        stream=sys.stderr)
    from runtime.quiet import quiet_libraries

    # before any role loads TensorFlow or a LiteRT interpreter (the roles import them lazily)
    quiet_libraries(verbose=args.verbose)

    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print(f"edgesplit {args.verb}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - every verb's errors end here, printed one way
        return report_error(f"edgesplit {args.verb}", exc, verbose=args.verbose)


def report_error(prog: str, exc: Exception, *, verbose: bool = False) -> int:
    """The one error printer of every entry point (``edgesplit``, ``python -m device.service``,
    ``python -m device.doctor``): one line saying what is wrong, one saying what to do, and the
    exit code — the error's own (2 a mistake in what was asked, 78 a configuration a service
    cannot run with, such as a refused broker login), 2 for a file that cannot be read or
    written, 1 for anything unforeseen.  The traceback only with ``-v``."""
    from protocol.errors import EdgesplitError

    if verbose:
        log.error("%s failed", prog, exc_info=exc)
    if isinstance(exc, EdgesplitError):
        message, fix, code = exc.message, exc.fix, exc.exit_code
    elif isinstance(exc, OSError):
        message, fix, code = str(exc), "check the path and its permissions", 2
    else:
        message, fix, code = f"{type(exc).__name__}: {exc}", "this is a bug: run again with -v and report " \
                                                              "the traceback", 1
    print(f"{prog}: error: {message}", file=sys.stderr)
    if fix:
        print(f"  fix: {fix}", file=sys.stderr)
    return code
