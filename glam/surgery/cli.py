"""`glam experts grow|upcycle`: checkpoint surgery commands (each writes a new run directory).

  glam experts grow --from=RUN --to=DIR --add=N [--init=copy|noisy_copy|random|preserve]
  glam experts upcycle --from=DENSE_RUN --to=DIR --gin_file=configs/models/glam_tiny.gin
"""
import json


def add_commands(commands) -> dict:
  experts = commands.add_parser("experts", help="grow experts, upcycle a dense model (new run directory)")
  sub = experts.add_subparsers(dest="experts_command", required=True)

  grow = sub.add_parser("grow", help="add N experts to every MoE layer (Lifelong-MoE)")
  grow.add_argument("--from", dest="source", required=True, help="run directory to grow (left unchanged)")
  grow.add_argument("--to", dest="target", required=True, help="new run directory (must hold no checkpoint)")
  grow.add_argument("--add", type=int, required=True, help="experts to add per MoE layer")
  grow.add_argument("--init", default="noisy_copy", choices=["copy", "noisy_copy", "random", "preserve"])
  grow.add_argument("--noise", type=float, default=0.01,
                    help="noisy_copy: noise std as a fraction of each copied tensor's std")
  grow.add_argument("--seed", type=int, default=0)
  grow.add_argument("--reset_data", action="store_true",
                    help="do not carry the input position over (the next stage trains on other data)")

  upcycle = sub.add_parser("upcycle", help="start an MoE model from a dense checkpoint")
  upcycle.add_argument("--from", dest="source", required=True, help="dense run directory (left unchanged)")
  upcycle.add_argument("--to", dest="target", required=True, help="new run directory (must hold no checkpoint)")
  upcycle.add_argument("--gin_file", action="append", default=[], help="the MoE model's gin file(s)")
  upcycle.add_argument("--gin_search_path", action="append", default=[])
  upcycle.add_argument("--seed", type=int, default=0, help="initialises the fresh routers")
  return {"experts": run_experts}


def run_experts(args, bindings) -> int:
  if args.experts_command == "grow":
    from glam.surgery.grow import grow
    result = grow(args.source, args.target, args.add, init=args.init, noise=args.noise, seed=args.seed,
                  reset_data=args.reset_data, bindings=bindings)
  else:
    from glam.surgery.upcycle import upcycle
    result = upcycle(args.source, args.target, args.gin_file, bindings=bindings,
                     search_paths=args.gin_search_path, seed=args.seed)
  print(json.dumps(result))
  return 0
