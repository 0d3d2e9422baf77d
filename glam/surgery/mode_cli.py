"""`glam mode compose`: MoDE composition (writes a new run directory; sources are only read).

  glam mode compose --backbone=RUN --experts=RUN_A,RUN_B --to=DIR [--gate=backbone|experts]
"""
import json


def add_commands(commands) -> dict:
  mode = commands.add_parser("mode", help="MoDE: compose a backbone and domain experts")
  sub = mode.add_subparsers(dest="mode_command", required=True)
  compose = sub.add_parser("compose", help="one checkpoint from a backbone run and K expert runs")
  compose.add_argument("--backbone", required=True, help="the backbone run (a plain DecoderLM; left unchanged)")
  compose.add_argument("--experts", required=True,
                       help="comma-separated expert runs (configs/runs/mode_expert.gin), in domain order")
  compose.add_argument("--to", dest="target", required=True, help="new run directory (must hold no checkpoint)")
  compose.add_argument("--gate", default="backbone", choices=["backbone", "experts"],
                       help="backbone: gate scales zeroed, the composed model starts as the backbone; "
                            "experts: keep each expert's trained gate")
  return {"mode": run_mode}


def run_mode(args, bindings) -> int:
  from glam.surgery.compose import compose
  experts = [path for path in args.experts.split(",") if path]
  result = compose(args.backbone, experts, args.target, gate=args.gate)
  print(json.dumps(result))
  return 0
