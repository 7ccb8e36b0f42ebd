from impactx_ray.cli import main

raise SystemExit(main())
