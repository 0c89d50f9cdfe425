"""The dashboard and playground at /dashboard: server-rendered pages over the API's services."""
