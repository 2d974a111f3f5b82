"""The gevent edge: the only package that imports gevent and geventwebsocket."""
