"""The pure core: layout, stage configs, conditions and the planner.

Nothing in this package imports kopf, kubernetes, boto3 or torch; both drivers
(the kopf operator and the local runner) call it with what they observed.
"""
