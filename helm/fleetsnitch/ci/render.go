// Renders a Helm chart the way Helm's engine does for the functions it uses:
// text/template with missingkey=zero, sprig's TxtFuncMap (minus env/expandenv),
// include, tpl, required, toYaml/fromYaml, .Files.Get, .Release/.Chart/.Values/.Capabilities.
package main

import (
	"bytes"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"text/template"

	sprig "github.com/Masterminds/sprig"
	"sigs.k8s.io/yaml"
)

type files map[string][]byte

func (f files) Get(name string) string { return string(f[name]) }

func main() {
	chart := os.Args[1]
	valuesFiles := os.Args[2:]
	var chartMeta map[string]interface{}
	b, _ := os.ReadFile(filepath.Join(chart, "Chart.yaml"))
	must(yaml.Unmarshal(b, &chartMeta))
	values := map[string]interface{}{}
	b, _ = os.ReadFile(filepath.Join(chart, "values.yaml"))
	must(yaml.Unmarshal(b, &values))
	for _, vf := range valuesFiles {
		over := map[string]interface{}{}
		b, err := os.ReadFile(vf)
		must(err)
		must(yaml.Unmarshal(b, &over))
		values = merge(values, over)
	}
	fs := files{}
	must(filepath.Walk(chart, func(p string, info os.FileInfo, err error) error {
		if err != nil || info.IsDir() {
			return err
		}
		rel, _ := filepath.Rel(chart, p)
		if !strings.HasPrefix(rel, "templates/") {
			c, _ := os.ReadFile(p)
			fs[rel] = c
		}
		return nil
	}))
	top := map[string]interface{}{
		"Values":  values,
		"Release": map[string]interface{}{"Name": "fleetsnitch", "Namespace": "monitoring", "Service": "Helm", "IsInstall": true, "IsUpgrade": false, "Revision": 1},
		"Chart": map[string]interface{}{"Name": chartMeta["name"], "Version": chartMeta["version"], "AppVersion": chartMeta["appVersion"]},
		"Files":        fs,
		"Capabilities": map[string]interface{}{"KubeVersion": map[string]interface{}{"Version": "v1.30.0"}},
	}
	t := template.New("gotpl").Option("missingkey=zero")
	funcs := sprig.TxtFuncMap()
	delete(funcs, "env")
	delete(funcs, "expandenv")
	includedNames := map[string]int{}
	funcs["include"] = func(name string, data interface{}) (string, error) {
		includedNames[name]++
		if includedNames[name] > 1000 {
			return "", fmt.Errorf("recursion in %s", name)
		}
		var buf bytes.Buffer
		err := t.ExecuteTemplate(&buf, name, data)
		includedNames[name]--
		return buf.String(), err
	}
	funcs["tpl"] = func(s string, data interface{}) (string, error) {
		tt, err := t.Clone()
		if err != nil {
			return "", err
		}
		tt, err = tt.New("tpl").Parse(s)
		if err != nil {
			return "", err
		}
		var buf bytes.Buffer
		err = tt.Execute(&buf, data)
		return buf.String(), err
	}
	funcs["required"] = func(msg string, v interface{}) (interface{}, error) {
		if v == nil || v == "" {
			return nil, fmt.Errorf(msg)
		}
		return v, nil
	}
	funcs["toYaml"] = func(v interface{}) string {
		out, err := yaml.Marshal(v)
		if err != nil {
			return ""
		}
		return strings.TrimSuffix(string(out), "\n")
	}
	funcs["fromYaml"] = func(s string) map[string]interface{} {
		m := map[string]interface{}{}
		_ = yaml.Unmarshal([]byte(s), &m)
		return m
	}
	funcs["lookup"] = func(string, string, string, string) (map[string]interface{}, error) {
		return map[string]interface{}{}, nil
	}
	t.Funcs(funcs)
	var names []string
	must(filepath.Walk(filepath.Join(chart, "templates"), func(p string, info os.FileInfo, err error) error {
		if err != nil || info.IsDir() {
			return err
		}
		rel, _ := filepath.Rel(chart, p)
		c, _ := os.ReadFile(p)
		_, err = t.New(filepath.Join(chartMeta["name"].(string), rel)).Parse(string(c))
		if err != nil {
			return err
		}
		names = append(names, filepath.Join(chartMeta["name"].(string), rel))
		return nil
	}))
	sort.Strings(names)
	for _, n := range names {
		if strings.HasPrefix(filepath.Base(n), "_") || !(strings.HasSuffix(n, ".yaml") || strings.HasSuffix(n, ".yml")) {
			continue
		}
		var buf bytes.Buffer
		must(t.ExecuteTemplate(&buf, n, top))
		out := strings.ReplaceAll(buf.String(), "<no value>", "")
		if strings.TrimSpace(out) == "" {
			continue
		}
		fmt.Printf("---\n# Source: %s\n%s\n", n, strings.TrimSpace(out))
	}
}

func merge(dst, src map[string]interface{}) map[string]interface{} {
	for k, v := range src {
		if sm, ok := v.(map[string]interface{}); ok {
			if dm, ok := dst[k].(map[string]interface{}); ok {
				dst[k] = merge(dm, sm)
				continue
			}
		}
		dst[k] = v
	}
	return dst
}

func must(err error) {
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
}
