//go:build tools

// Keeps the commands scripts/kube-up.sh builds in this module's requirements.
package kubebuild
