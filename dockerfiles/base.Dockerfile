# Offline base image for builder's tests and examples: a static busybox on
# top of scratch.  Nothing is pulled from a registry.
#
# Build context (prepared by scripts/lib.sh: ensure_base_image):
#   busybox      the static binary from Debian's busybox-static (/bin/busybox)
#   Dockerfile   this file
#
# Image name: builder-busybox:latest (BASE_IMAGE in scripts/lib.sh,
# overridable with BUILDER_BASE_IMAGE).
FROM scratch

COPY busybox /bin/busybox

# Exec form: there is no shell in the image until busybox installs one.
RUN ["/bin/busybox", "sh", "-c", "/bin/busybox --install -s /bin && /bin/busybox mkdir -p /tmp /root /etc /usr/bin /usr/sbin /sbin /var/tmp && /bin/busybox chmod 1777 /tmp /var/tmp && echo 'root:x:0:0:root:/root:/bin/sh' > /etc/passwd && echo 'root:x:0:' > /etc/group"]

ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
WORKDIR /
CMD ["sh"]
