"""`uharmony fed keys|register|serve|join`: the federation's command line (see README, "Running a federation")."""

from __future__ import annotations

from uharmony.device import DEVICE_CHOICES
from uharmony.progress import MODES


def add_fed_parser(sub, epilog: str) -> None:
    p = sub.add_parser("fed", help="federated training over Flower (FedGIN): keys, register, serve, join",
                       epilog=epilog)
    fsub = p.add_subparsers(dest="fed_command", required=True, metavar="ACTION")

    q = fsub.add_parser("keys", help="make the coordinator's CA/server certificate or a site's key pair")
    ksub = q.add_subparsers(dest="keys_command", required=True, metavar="KIND")
    k = ksub.add_parser("ca", help="DIR/ca.crt, ca.key, server.crt, server.key (SANs localhost, 127.0.0.1, ::1 + --host)")
    k.add_argument("--out", required=True, help="folder to write into")
    k.add_argument("--host", action="append", default=[], metavar="NAME",
                   help="another DNS name or IP address of the coordinator (repeatable)")
    k.add_argument("--overwrite", action="store_true")
    k = ksub.add_parser("site", help="DIR/NAME (private, 0600) and DIR/NAME.pub (ECDSA P-384, OpenSSH)")
    k.add_argument("--name", required=True, help="the site's name (letters, digits, '.', '_', '-')")
    k.add_argument("--out", required=True, help="folder to write into")
    k.add_argument("--overwrite", action="store_true")

    q = fsub.add_parser("register", help="register a site's public key with the running coordinator")
    q.add_argument("public_key", metavar="SITE.pub")
    q.add_argument("--config", required=True, help="the coordinator's fed.toml")

    q = fsub.add_parser("serve", help="run the coordinator: SuperLink + the U-Harmony ServerApp", epilog=epilog)
    q.add_argument("--config", required=True, help="fed.toml (every key in README); unknown keys are errors")
    q.add_argument("--progress", choices=MODES, default="auto")

    q = fsub.add_parser("join", help="join a federation as a site (runs a supervised SuperNode)", epilog=epilog)
    q.add_argument("--server", required=True, metavar="HOST:PORT", help="the coordinator's address")
    q.add_argument("--data", required=True, metavar="DATASET_JSON", help="this site's datalist (never leaves the site)")
    q.add_argument("--ca", default=None, help="the coordinator's CA certificate (ca.crt)")
    q.add_argument("--key", default=None, help="this site's private key (from `uharmony fed keys site`)")
    q.add_argument("--insecure", action="store_true", help="no TLS and no key: only when every end is on loopback")
    q.add_argument("--device", default="auto", choices=DEVICE_CHOICES)
    q.add_argument("--progress", choices=MODES, default="auto")


def run_fed(args, reporter) -> int:
    from uharmony.fed import flower

    if args.fed_command == "keys":
        from uharmony.fed.keys import make_ca, make_site_key

        if args.keys_command == "ca":
            paths = make_ca(args.out, args.host, overwrite=args.overwrite)
            for p in paths.values():
                print(p)
            return 0
        _private, public, line = make_site_key(args.name, args.out, overwrite=args.overwrite)
        print(public)
        print(line)
        return 0
    flower.require_flower()
    if args.fed_command == "register":
        from uharmony.fed.serve import run_register

        return run_register(args.public_key, args.config)
    if args.fed_command == "serve":
        from uharmony.fed.serve import run_serve

        return run_serve(args.config, reporter)
    if args.fed_command == "join":
        from uharmony.fed.join import run_join

        return run_join(args.server, args.data, args.ca, args.key, insecure=args.insecure, device=args.device,
                        reporter=reporter)
    raise AssertionError(args)


__all__ = ["add_fed_parser", "run_fed"]
